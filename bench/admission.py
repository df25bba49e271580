"""Figure 8, admission under abuse: a key past its submit burst sends 10 concurrent img2img
requests with 4096x4096 JPEGs (IMAGEGEN_SUBMIT_BURST=2, the rate too low to refill during
the burst). What each refusal costs is the figure: its 429's latency, and the CPU the
ingress replicas spent on the whole burst, against that of decoding the same image twice
in this process the way the ingress does (`decode_input_image`: the two requests the burst
admits must be decoded; the eight refused must cost next to nothing). Then, with that key
still limited, 300 keyless /healthz and /readyz probes within 2 s: all must be 200.

Issue 24's targets: >= 7 of 10 answered 429, each in under 50 ms; the burst's ingress CPU
under 2x that of two decodes; 300 of 300 probes 200. The 429s are sent before the body is
read, so their latency is measured twice: as Python clients send (the whole body first:
the client also waits for its own upload through HAProxy) and as curl sends a large body
(`Expect: 100-continue`: the refusal comes before any upload), which is the server's own
answer time and the one the target is checked against.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from bench.cluster import APP_NAME, BENCH_KEY
from bench.common import log, ratio, rnd
from bench.context import Context
from bench.loadgen import Client

NAME = "admission"
SIDE = 4096
REQUESTS = 10
PROBES = 300
PROBE_WINDOW_S = 2.0
KEYED = {"Authorization": f"Bearer {BENCH_KEY}"}


def big_jpeg() -> bytes:
    """A 4096x4096 photo-like JPEG (smooth gradients and texture: ~2-4 MB, as a camera's)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(24)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200
    texture = rng.normal(0, 12, (SIDE // 8, SIDE // 8, 3)).repeat(8, 0).repeat(8, 1)
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def decode_cpu_s(data_uri: str, times: int) -> float:
    """Process CPU seconds for `times` decodes as the ingress decodes an input image."""
    from serve_app.api.input_images import decode_input_image
    from serve_app.settings import Limits

    decode_input_image(data_uri, "initImage", Limits())  # warm: imports, codecs
    before = time.process_time()
    for _ in range(times):
        decode_input_image(data_uri, "initImage", Limits())
    return time.process_time() - before


def ingress_pids() -> list[psutil.Process]:
    prefix = f"ray::ServeReplica:{APP_NAME}:Ingress"
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(prefix):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def post(url: str, body: bytes) -> tuple[int, float]:
    """One submit on a connection of its own; its status and seconds to the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.connect()
        # As curl and every HTTP library does: without it the body's first segment waits
        # for the ACK of the headers' (Nagle), and a 429 costs the client ~200 ms.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        began = time.perf_counter()
        conn.request("POST", "/generate/img2img", body,
                     KEYED | {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - began
    finally:
        conn.close()


def post_expecting(url: str, body: bytes) -> tuple[int, float]:
    """One submit as curl sends a large body: headers with `Expect: 100-continue` first,
    the body only after the server's `100 Continue` (curl waits up to 1 s). A refusal
    answered before the body is read costs the client no upload."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (f"POST /generate/img2img HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: {KEYED['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        began = time.perf_counter()
        sock.sendall(head)
        sock.settimeout(1.0)
        try:
            status = int(reader.readline().split()[1])
        except TimeoutError:
            status = 100  # as curl: no answer within a second, send the body anyway
        sock.settimeout(120)
        if status == 100:
            while reader.readline() not in (b"\r\n", b""):
                pass
            sock.sendall(body)
            status = int(reader.readline().split()[1])
        return status, time.perf_counter() - began


def probe(url: str, path: str) -> int:
    with Client(url) as client:
        return client.get(path)[0]


def run(ctx: Context) -> dict[str, Any]:
    url = ctx.deploy("admission")
    jpeg = big_jpeg()
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    body = json.dumps({"prompt": "a lake", "initImage": uri, "strength": 0.5,
                       "width": 64, "height": 64, "steps": 2}).encode()
    log(f"admission: one {SIDE}x{SIDE} JPEG of {len(jpeg) / 1e6:.1f} MB, {REQUESTS} at once")
    two_decodes_s = decode_cpu_s(uri, 2)
    procs = ingress_pids()
    before = cpu_s(procs)
    with ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(lambda _: post(url, body), range(REQUESTS)))
    burst_cpu_s = cpu_s(procs) - before
    refused = [s for status, s in answers if status == 429]
    # The same refused request on its own, the burst over: what a 429 costs by itself.
    alone = [post(url, body) for _ in range(3)]
    # And the burst as curl sends it (Expect: 100-continue): refusals without uploads.
    with ThreadPoolExecutor(REQUESTS) as pool:
        expecting = list(pool.map(lambda _: post_expecting(url, body), range(REQUESTS)))

    # The key is limited now; probes have no key and must not be.
    paths = ["/healthz", "/readyz"] * (PROBES // 2)
    began = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda p: probe(url, p), paths))
    probe_s = time.perf_counter() - began
    cpu_ratio = ratio(burst_cpu_s, two_decodes_s)
    slowest_429_ms = rnd(1000 * max(refused)) if refused else None
    return {
        "figure": "ingress CPU for 10 concurrent 4096² img2img submits of a key past its "
                  "burst of 2 ÷ CPU of two decodes of that image in process",
        "ratio": cpu_ratio,
        "target": "< 2; >= 7 answered 429, each < 50 ms; 300/300 probes 200 within 2 s",
        # The server's answer time is what a client that waits for `100 Continue` sees; a
        # client that uploads first also waits for its own 1.8 MB (both are reported).
        "met": (cpu_ratio is not None and cpu_ratio < 2 and len(refused) >= 7
                and all(s < 0.05 for st, s in expecting if st == 429)
                and statuses.count(200) == PROBES and probe_s <= PROBE_WINDOW_S),
        "headline": {"refused_429": len(refused), "slowest_429_ms": slowest_429_ms,
                     "alone_429_ms": max((rnd(1000 * s) or 0.0 for st, s in alone
                                          if st == 429), default=None),
                     "expect_continue_slowest_429_ms": max(
                         (rnd(1000 * s) or 0.0 for st, s in expecting if st == 429),
                         default=None),
                     "burst_ingress_cpu_s": rnd(burst_cpu_s, 3),
                     "two_decodes_cpu_s": rnd(two_decodes_s, 3),
                     "probes_200": statuses.count(200), "probes_s": rnd(probe_s)},
        "statuses": sorted(status for status, _ in answers),
        "latency_ms": sorted(rnd(1000 * s) for _, s in answers),
        "alone_429_ms": [rnd(1000 * s) for status, s in alone if status == 429],
        "expect_continue": {"statuses": sorted(status for status, _ in expecting),
                            "latency_ms": sorted(rnd(1000 * s) for _, s in expecting)},
        "jpeg_bytes": len(jpeg),
        "ingress_replicas": len(procs),
        "probe_statuses": {str(s): statuses.count(s) for s in set(statuses)},
    }

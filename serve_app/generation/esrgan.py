"""ESRGAN (RRDBNet) super-resolution models, built in: the architecture, the state-dict key
formats real weights ship in, and a seeded tiny model for tests.

Used by `serve_app.generation.upscalers` when the `spandrel` library is not importable
(spandrel needs torchvision, whose wheels for this torch are CUDA builds that do not load
next to a CPU torch). The architecture follows the published RRDBNet (Wang et al., 2018;
Real-ESRGAN's `RRDBNet`), so the same weights files load either way:

- "new arch" (BasicSR / Real-ESRGAN, e.g. RealESRGAN_x4plus.pth): `conv_first`,
  `body.N.rdbJ.convK`, `conv_body`, `conv_up1..`, `conv_hr`, `conv_last`, optionally
  wrapped in `params_ema` or `params`;
- "old arch" (the original ESRGAN release and most community models):
  `model.0`, `model.1.sub.N.RDBJ.convK.0`, `model.1.sub.<nb>`, `model.3/6/..`, ...;
- BSRGAN / RealSR: `RRDB_trunk.N.RDBJ.convK`, `trunk_conv`, `upconvN`, `HRconv`.

Each is mapped onto the new-arch names; the shape of the state dict says the rest (features,
blocks, growth channels, upsampling stages, and Real-ESRGAN's pixel-unshuffle input for its
x2 and x1 models).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from serve_app.errors import ConfigError

StateDict = dict[str, torch.Tensor]


class _DenseBlock(nn.Module):
    """Residual dense block: five 3x3 convs, each seeing every earlier output."""

    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(feat, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(feat + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(feat + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(feat + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            outs.append(F.leaky_relu(conv(torch.cat(outs, 1)), 0.2))
        return self.conv5(torch.cat(outs, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(feat, grow)
        self.rdb2 = _DenseBlock(feat, grow)
        self.rdb3 = _DenseBlock(feat, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class Shape:
    """What a state dict says about its network."""

    in_ch: int = 3
    out_ch: int = 3
    feat: int = 64
    blocks: int = 23
    grow: int = 32
    ups: int = 2  # x2 nearest-neighbour upsampling stages
    unshuffle: int = 1  # Real-ESRGAN x2 (2) and x1 (4) models see a pixel-unshuffled input

    @property
    def scale(self) -> int:
        return 2**self.ups // self.unshuffle


class RRDBNet(nn.Module):
    """ESRGAN's generator. Input and output: N x 3 x H x W floats in [0, 1]; the output is
    `shape.scale` times larger."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape
        s = shape
        self.conv_first = nn.Conv2d(s.in_ch * s.unshuffle**2, s.feat, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(s.feat, s.grow) for _ in range(s.blocks)))
        self.conv_body = nn.Conv2d(s.feat, s.feat, 3, 1, 1)
        for i in range(1, s.ups + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(s.feat, s.feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(s.feat, s.feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(s.feat, s.out_ch, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.shape.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.shape.ups + 1):
            up = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


_RENAMES = (  # BSRGAN / RealSR names -> new arch
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\."), r"body.\1.rdb\2.conv\3."),
    (re.compile(r"^trunk_conv\."), "conv_body."),
    (re.compile(r"^upconv(\d)\."), r"conv_up\1."),
    (re.compile(r"^HRconv\."), "conv_hr."),
)
_OLD_BODY = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def to_new_arch(state: StateDict) -> StateDict:
    """Any of the supported key formats (module docstring) as new-arch keys."""
    for wrapper in ("params_ema", "params", "state_dict"):
        inner = state.get(wrapper)
        if isinstance(inner, dict):
            state = inner
    if "model.0.weight" in state:
        return _from_old_arch(state)
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _from_old_arch(state: StateDict) -> StateDict:
    out: StateDict = {}
    tops: dict[int, dict[str, torch.Tensor]] = {}
    trunk: dict[str, torch.Tensor] = {}
    blocks = 0
    for key, value in state.items():
        if m := _OLD_BODY.match(key):
            n, j, k, kind = m.groups()
            out[f"body.{n}.rdb{j}.conv{k}.{kind}"] = value
            blocks = max(blocks, int(n) + 1)
        elif m := re.match(r"^model\.1\.sub\.(\d+)\.(weight|bias)$", key):
            trunk[m.group(2)] = value
        elif m := _OLD_TOP.match(key):
            tops.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            raise ConfigError(f"ESRGAN weights: unexpected key {key!r} in an old-arch state dict")
    # model.0: first conv; then [upsample, conv, lrelu] per x2 stage (convs at 3, 6, ...);
    # then the HR conv and the last conv, two apart.
    indices = sorted(i for i in tops if i > 0)
    if len(indices) < 2:
        raise ConfigError("ESRGAN weights: an old-arch state dict without its last layers")
    *ups, hr, last = indices
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
    names |= {idx: f"conv_up{n}" for n, idx in enumerate(ups, start=1)}
    for idx, params in tops.items():
        for kind, value in params.items():
            out[f"{names[idx]}.{kind}"] = value
    for kind, value in trunk.items():
        out[f"conv_body.{kind}"] = value
    return out


def shape_of(state: StateDict) -> Shape:
    """The network a new-arch state dict describes."""
    try:
        first = state["conv_first.weight"]
        last = state["conv_last.weight"]
        grow = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise ConfigError(f"not an ESRGAN (RRDBNet) state dict: no {exc.args[0]!r}") from None
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    ups = sum(1 for k in state if re.match(r"^conv_up\d+\.weight$", k))
    out_ch = int(last.shape[0])
    in_total = int(first.shape[1])
    unshuffle = {out_ch: 1, out_ch * 4: 2, out_ch * 16: 4}.get(in_total)
    if unshuffle is None:
        raise ConfigError(f"ESRGAN weights: {in_total} input channels for {out_ch} output "
                          "channels is not a layout this loader knows")
    return Shape(in_ch=in_total // unshuffle**2, out_ch=out_ch, feat=int(first.shape[0]),
                 blocks=blocks, grow=int(grow), ups=ups, unshuffle=unshuffle)


def load_state_dict(path: Path) -> StateDict:
    """A `.safetensors`, `.pth` or `.pt` weights file (tensors only: `weights_only`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return loaded


def load_esrgan(state: StateDict) -> RRDBNet:
    """An RRDBNet with `state`'s weights (any supported key format), in eval mode."""
    new = to_new_arch(state)
    net = RRDBNet(shape_of(new))
    missing, unexpected = net.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise ConfigError(f"ESRGAN weights do not fit RRDBNet: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    return net.eval()


# The embedded test upscaler: the real architecture, small and seeded (~40 KB).
TINY_SHAPE = Shape(feat=8, blocks=1, grow=4, ups=2)
# How far (in input pixels) a tiny-model output pixel sees: 1 + 3 x 5 + 1 convs at the
# input's resolution, and four more at x2 and x4 (under one input pixel): 18. Tiles with at
# least this much context on each side give exactly the untiled pixels.
TINY_RECEPTIVE_RADIUS = 18


def build_tiny_esrgan(target: Path, seed: int = 0) -> Path:
    """Write a seeded tiny x4 ESRGAN as new-arch `.safetensors` at `target` (atomically).
    Random weights: like the tiny diffusion models, it makes noise-like images, through
    the real architecture and loader. The last layer is centred on mid-grey and amplified,
    so its output varies with its input instead of clamping to black."""
    from safetensors.torch import save_file

    if target.is_file():
        return target
    torch.manual_seed(seed)
    net = RRDBNet(TINY_SHAPE)
    with torch.no_grad():
        net.conv_last.bias.fill_(0.5)
        net.conv_last.weight.mul_(6.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    os.chmod(staging, 0o644)  # mkstemp makes it private; the others in the cache are not
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, staging)
    os.replace(staging, target)  # atomic: a concurrent builder writes the same bytes
    return target

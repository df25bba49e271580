"""Where a webhook may be sent: the one rule, shared by the ingress and the deliverer.

A webhook makes this service send requests to an address a client chose, from inside the
operator's network: without a rule, a client could reach the cloud's metadata service
(169.254.169.254), Redis on loopback or any private host. So a target is http(s) with a
host, and every address it is sent to must be a public one, unless the operator allows
private targets (`IMAGEGEN_WEBHOOK_ALLOW_PRIVATE=1`, e.g. for a receiver on the same
network). The ingress checks literal addresses at submit (a 400 naming the field); names are
resolved and every address checked again at each delivery, which then connects to the
address it checked (no second lookup that could answer otherwise).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048
SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that carry an IPv4 address inside an IPv6 one: checked as that IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Cloud metadata services (named as such in the error; most are link-local or private too).
_METADATA = frozenset(map(ipaddress.ip_address, (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack (also link-local)
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS over IPv6
)))


def blocked_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public one (None when it is)."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return blocked_reason(embedded)
    if address in _METADATA:
        return "a cloud metadata address"
    for reason, hit in (("a loopback address", address.is_loopback),
                        ("an unspecified address", address.is_unspecified),
                        ("a link-local address", address.is_link_local),
                        ("a multicast address", address.is_multicast),
                        ("a private address", address.is_private),
                        ("a reserved address", address.is_reserved)):
        if hit:
            return reason
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking ranges
        return "not a public address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one (IPv6 in brackets or not), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def check_url(url: str, *, allow_private: bool) -> str | None:
    """What is wrong with `url` as a webhook target (None when nothing is). Names are not
    resolved here: that happens at each delivery."""
    if len(url) > MAX_URL_CHARS:
        return f"is too long ({len(url)} characters, at most {MAX_URL_CHARS})"
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number in 0..65535 raises here
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in SCHEMES:
        return f"must be an http or https URL (got scheme {parts.scheme or 'none'!r})"
    host = parts.hostname
    if not host:
        return "must name a host, e.g. https://example.com/hooks"
    if any(c.isspace() for c in url):
        return "must not contain spaces"
    address = literal_address(host)
    if address is not None and not allow_private:
        reason = blocked_reason(address)
        if reason is not None:
            return (f"points at {address}, {reason}; only public addresses are allowed "
                    "unless the server sets IMAGEGEN_WEBHOOK_ALLOW_PRIVATE=1")
    return None

"""Who is asking: client address, credentials and CORS, read off a request.

Pure functions of request data and config (no hub, no Redis), so each rule
is easy to test and the same everywhere it is used.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from aiohttp import web

from broker.auth import Credentials
from broker.config import Config

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Where a dual-stack (IPv6) socket puts its IPv4 peers: ::ffff:a.b.c.d.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_ALL_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")


def _unmapped(ip: Address) -> Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_ip(address: str) -> str:
    """``address`` as the broker compares, counts and logs it.

    An IPv4-mapped IPv6 address (``::ffff:203.0.113.7``: how a dual-stack
    listener reports an IPv4 peer) becomes the IPv4 address, and every
    address is written in its canonical form (``2001:DB8::1`` ->
    ``2001:db8::1``), so one client is one key of the per-IP limit whichever
    way it arrived. What is not an address (an obfuscated ``X-Forwarded-For``
    hop such as ``unknown``) is returned stripped but otherwise unchanged.
    """
    address = address.strip()
    try:
        return str(_unmapped(ipaddress.ip_address(address)))
    except ValueError:
        return address


def trusted_networks(entries: Iterable[str | Network]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` as networks, in the form peers are compared in.

    Takes the networks the config parsed (``cfg.server.trusted_networks``) or
    the entries as written. Peers are compared as IPv4 when they are
    IPv4-mapped (``normalize_ip``), so an entry written mapped
    (``::ffff:10.0.0.1``, ``::ffff:10.0.0.0/104``) becomes its IPv4 network,
    and an IPv6 network that spans every mapped address (``::/0``) covers
    every IPv4 address as well.
    """
    networks: list[Network] = []
    for entry in entries:
        net = ipaddress.ip_network(entry, strict=False) if isinstance(entry, str) else entry
        if isinstance(net, ipaddress.IPv6Network):
            if net.subnet_of(_IPV4_MAPPED):
                first = int(net.network_address) - int(_IPV4_MAPPED.network_address)
                net = ipaddress.IPv4Network((first, net.prefixlen - 96))
            elif net.supernet_of(_IPV4_MAPPED):
                networks.append(_ALL_IPV4)
        networks.append(net)
    return tuple(networks)


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = _unmapped(ipaddress.ip_address(address.strip()))
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def peer_is_trusted(request: web.Request, trusted: tuple[Network, ...]) -> bool:
    """A proxy in ``server.trusted_proxies``, or a peer on a Unix socket (a local proxy)."""
    transport = request.transport
    local = transport is not None and transport.get_extra_info("peername") in ("", None)
    return local or _is_trusted(request.remote or "", trusted)


def client_ip(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The client's address: ``X-Forwarded-For`` is believed only from trusted proxies.

    Walking the header from the right, the first address that is not a
    trusted proxy is the client (what a client writes further left is not
    trusted). The peer and every hop are compared and returned normalized
    (``normalize_ip``): an IPv4 client is an IPv4 address even when it came
    through a dual-stack listener.
    """
    peer = _peer(request) or ""
    if not peer_is_trusted(request, trusted):
        return peer
    hops = [
        normalize_ip(hop)
        for value in request.headers.getall("X-Forwarded-For", ())
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def credentials(request: web.Request, cfg: Config, ip: str, *, via_proxy: bool) -> Credentials:
    """The request's credentials, first present wins: Bearer, ``?token=``, cookie.

    The forwarding headers passed on to an auth backend are believed only
    ``via_proxy`` (a trusted peer): a client cannot choose the host or the
    address the app sees.
    """
    auth = cfg.auth
    authorization = request.headers.get("Authorization")
    token: str | None = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
    if token is None and auth.query_param:
        token = request.query.get(auth.query_param) or None
    if token is None and auth.cookie:
        token = request.cookies.get(auth.cookie) or None
    return Credentials(
        token=token,
        authorization=authorization,
        cookie_header=request.headers.get("Cookie"),
        cookies=dict(request.cookies),
        client_ip=ip,
        host=request.headers.get("Host", ""),
        forwarded_for=_forwarded_for(request) if via_proxy else _peer(request),
        forwarded_host=request.headers.get("X-Forwarded-Host") if via_proxy else None,
        socket_id=request.query.get("socket_id") or None,
    )


def _peer(request: web.Request) -> str | None:
    return normalize_ip(request.remote or "") or None


def _forwarded_for(request: web.Request) -> str | None:
    """The chain the trusted proxy sent, plus that proxy (as a proxy would extend it)."""
    chain = [h for h in request.headers.getall("X-Forwarded-For", ()) if h.strip()]
    peer = _peer(request)
    if peer:
        chain.append(peer)
    return ", ".join(chain) or None


class Cors:
    """``server.cors_origins``: exact origins, or ``https://*.example.com`` wildcards."""

    ALLOW_HEADERS = "Authorization, Last-Event-ID, Cache-Control, X-Requested-With"

    def __init__(self, origins: Iterable[str]) -> None:
        exact: set[str] = set()
        patterns: list[str] = []
        for origin in origins:
            if "://*." in origin:
                scheme, _, rest = origin.partition("://*.")
                # One or more DNS labels before the suffix; never the bare suffix.
                patterns.append(
                    re.escape(scheme) + r"://[a-z0-9-]+(?:\.[a-z0-9-]+)*\." + re.escape(rest)
                )
            else:
                exact.add(origin.lower())
        self.exact = frozenset(exact)
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    @property
    def enabled(self) -> bool:
        return bool(self.exact) or self.regex is not None

    def allows(self, origin: str) -> bool:
        origin = origin.lower()
        return origin in self.exact or (
            self.regex is not None and self.regex.fullmatch(origin) is not None
        )

    def headers(self, origin: str | None) -> dict[str, str]:
        """CORS headers for a response to ``origin`` (none for other origins)."""
        if not origin or not self.allows(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
        }

    def preflight_headers(self, origin: str | None) -> dict[str, str]:
        headers = self.headers(origin)
        if headers:
            headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
            headers["Access-Control-Allow-Headers"] = self.ALLOW_HEADERS
            headers["Access-Control-Max-Age"] = "600"
        return headers

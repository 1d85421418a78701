"""Peers on a dual-stack listener: IPv4 clients and proxies as ``::ffff:a.b.c.d``.

An IPv6 socket with ``IPV6_V6ONLY`` off (what ``ListenStream=[::]:8080`` or
``ListenStream=8080`` gives under systemd) also accepts IPv4 connections and
reports their peer as an IPv4-mapped IPv6 address. The broker compares, counts
and logs such a peer, and every ``X-Forwarded-For`` hop, as the IPv4 address,
so ``server.trusted_proxies = ["127.0.0.1"]`` means the same on that socket as
on an IPv4 one. asyncio sets ``IPV6_V6ONLY`` on sockets it creates itself, so
the end-to-end test hands the broker a real dual-stack socket by socket
activation (``LISTEN_FDS``, as systemd would) and connects to it over IPv4.
"""

from __future__ import annotations

import asyncio
import socket
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from conftest import BrokerProcess
from helpers import eventually, get, stream
from multidict import CIMultiDict
from sse_client import SSEClient

# Shared with the socket-activation tests: spawns a broker with a listening socket as fd 3.
from test_systemd import SpawnActivated, spawn_activated  # noqa: F401

from broker.access import client_ip, credentials, normalize_ip, peer_is_trusted, trusted_networks
from broker.config import Config

# -- normalization, as tables -------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("::FFFF:203.0.113.7", "203.0.113.7"),
        ("::ffff:cb00:7107", "203.0.113.7"),  # the same, in hex
        ("0:0:0:0:0:ffff:203.0.113.7", "203.0.113.7"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        # only the mapped form is IPv4: IPv4-compatible and NAT64 addresses stay IPv6
        ("::127.0.0.1", "::7f00:1"),
        ("64:ff9b::203.0.113.7", "64:ff9b::cb00:7107"),
        # not addresses: passed on as written (stripped)
        ("unknown", "unknown"),
        (" _hidden ", "_hidden"),
        ("203.0.113.7:8080", "203.0.113.7:8080"),
        ("::ffff:203.0.113.999", "::ffff:203.0.113.999"),
        ("", ""),
    ],
)
def test_normalize_ip(given: str, expected: str) -> None:
    assert normalize_ip(given) == expected


def fake_request(peer: str | tuple[str, int] | tuple[str, int, int, int], *xff: str) -> web.Request:
    """A request whose transport reports ``peer`` (a string is a Unix socket's ``""``),
    with one ``X-Forwarded-For`` header line per ``xff``."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        peer if name == "peername" else default
    )
    headers = CIMultiDict(("X-Forwarded-For", value) for value in xff)
    return make_mocked_request("GET", "/events", headers=headers, transport=transport)


def tcp(address: str) -> tuple[str, int] | tuple[str, int, int, int]:
    """The peername a socket of the address's family reports."""
    return (address, 40000, 0, 0) if ":" in address else (address, 40000)


@pytest.mark.parametrize(
    ("entries", "peer", "trusted"),
    [
        # the finding: an IPv4 proxy seen through a dual-stack socket
        (["127.0.0.1"], "::ffff:127.0.0.1", True),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["10.0.0.0/8"], "::ffff:11.1.2.3", False),
        # entries written IPv4-mapped match the peer in either form
        (["::ffff:10.0.0.1"], "10.0.0.1", True),
        (["::ffff:10.0.0.1"], "::ffff:10.0.0.1", True),
        (["::ffff:10.0.0.1"], "10.0.0.2", False),
        (["::ffff:10.0.0.0/104"], "10.255.0.1", True),
        (["::ffff:10.0.0.0/104"], "::ffff:10.255.0.1", True),
        (["::ffff:10.0.0.0/104"], "11.0.0.1", False),
        (["::ffff:0:0/96"], "198.51.100.1", True),
        # an IPv6 network holding every mapped address holds every IPv4 address
        (["::/0"], "198.51.100.1", True),
        (["::/0"], "2001:db8::1", True),
        # other families and look-alikes stay apart
        (["127.0.0.1"], "::1", False),
        (["::1"], "127.0.0.1", False),
        (["::1"], "::ffff:127.0.0.1", False),
        (["127.0.0.1"], "::127.0.0.1", False),  # IPv4-compatible, not mapped
        (["2001:db8::/32"], "::ffff:10.0.0.1", False),
        (["2001:db8::/32"], "2001:db8::5", True),
        ([], "::ffff:127.0.0.1", False),
    ],
)
def test_trusted_proxies_match_ipv4_mapped_peers(
    entries: list[str], peer: str, trusted: bool
) -> None:
    assert peer_is_trusted(fake_request(tcp(peer)), trusted_networks(entries)) is trusted


def test_a_unix_socket_peer_is_a_trusted_local_proxy() -> None:
    assert peer_is_trusted(fake_request(""), trusted_networks([]))


@pytest.mark.parametrize(
    ("peer", "xff", "entries", "client"),
    [
        # the finding: the proxy arrives mapped, its X-Forwarded-For is believed
        ("::ffff:127.0.0.1", ["203.0.113.7"], ["127.0.0.1"], "203.0.113.7"),
        ("::ffff:127.0.0.1", ["203.0.113.7"], ["::ffff:127.0.0.1"], "203.0.113.7"),
        # without the header, or from an untrusted peer: the peer, as IPv4
        ("::ffff:127.0.0.1", [], ["127.0.0.1"], "127.0.0.1"),
        ("::ffff:198.51.100.9", ["203.0.113.7"], ["127.0.0.1"], "198.51.100.9"),
        ("::ffff:198.51.100.9", [], [], "198.51.100.9"),
        # hops are normalized: a mapped trusted proxy in the chain is skipped ...
        ("::ffff:10.0.0.2", ["203.0.113.7, ::ffff:10.0.0.1"], ["10.0.0.0/8"], "203.0.113.7"),
        ("10.0.0.2", ["203.0.113.7", "::ffff:10.0.0.1"], ["::ffff:10.0.0.0/104"], "203.0.113.7"),
        # ... and a mapped client is its IPv4 address (one per-IP limit key)
        ("10.0.0.2", ["::ffff:203.0.113.7"], ["10.0.0.0/8"], "203.0.113.7"),
        ("10.0.0.2", ["198.51.100.1, ::FFFF:203.0.113.7 "], ["10.0.0.0/8"], "203.0.113.7"),
        ("2001:db8::5", ["2001:DB8::7"], ["2001:db8::/64"], "2001:db8::7"),
        # every hop is a trusted proxy: the left-most, normalized
        ("::ffff:10.0.0.2", ["::ffff:10.0.0.1"], ["10.0.0.0/8"], "10.0.0.1"),
        # what is not an address is passed on as it is
        ("::ffff:127.0.0.1", ["unknown"], ["127.0.0.1"], "unknown"),
        # a local proxy on a Unix socket
        ("", ["::ffff:203.0.113.7"], [], "203.0.113.7"),
    ],
)
def test_client_ip_is_normalized(
    peer: str, xff: list[str], entries: list[str], client: str
) -> None:
    request = fake_request(tcp(peer) if peer else "", *xff)
    assert client_ip(request, trusted_networks(entries)) == client


def test_the_forwarded_chain_for_auth_backends_ends_with_the_normalized_proxy() -> None:
    trusted = trusted_networks(["127.0.0.1"])
    request = fake_request(tcp("::ffff:127.0.0.1"), "203.0.113.7")
    creds = credentials(request, Config(), client_ip(request, trusted), via_proxy=True)
    assert (creds.client_ip, creds.forwarded_for) == ("203.0.113.7", "203.0.113.7, 127.0.0.1")
    untrusted = fake_request(tcp("::ffff:198.51.100.9"), "203.0.113.7")
    creds = credentials(untrusted, Config(), client_ip(untrusted, trusted), via_proxy=False)
    assert (creds.client_ip, creds.forwarded_for) == ("198.51.100.9", "198.51.100.9")


# -- end to end: a real broker on a real dual-stack socket ---------------------------------


def dual_stack_socket() -> socket.socket:
    """What ``ListenStream=[::]:PORT`` gives: one IPv6 socket that accepts IPv4 as well.

    It is checked before use: an IPv4 connection to it is accepted with an
    IPv4-mapped peer (the premise of these tests)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", 0))
    sock.listen(128)
    with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5):
        accepted, peer = sock.accept()
        accepted.close()
    assert peer[0] == "::ffff:127.0.0.1", peer
    return sock


async def closed_remotes(broker: BrokerProcess, *remotes: str) -> str:
    """The log, once it has a ``stream closed remote=<r>`` line for every ``r``."""
    return await eventually(
        lambda: asyncio.sleep(0, broker.log_text()),
        lambda log: all(f"stream closed remote={r} " in log for r in remotes),
    )


@pytest.mark.slow
@pytest.mark.parametrize("proxy", ["127.0.0.1", "::ffff:127.0.0.1"])
async def test_an_ipv4_proxy_on_a_dual_stack_listener_is_trusted(
    spawn_activated: SpawnActivated,  # noqa: F811
    http: aiohttp.ClientSession,
    proxy: str,
) -> None:
    listener = dual_stack_socket()
    try:
        broker = await spawn_activated(
            listener, f"server.trusted_proxies=['{proxy}']", "limits.max_connections_per_ip=1"
        )
        await broker.wait_ready()
        port = listener.getsockname()[1]
        assert f"inherited socket ('::', {port}, 0, 0)" in broker.log_text()
        # The test connects to 127.0.0.1: the broker's peer is ::ffff:127.0.0.1, a
        # trusted proxy, so X-Forwarded-For names the client and the limit counts it.
        url = broker.events_url("news")
        async with stream(broker, "news", headers={"X-Forwarded-For": "203.0.113.7"}):
            status, body, _ = await get(http, url, {"X-Forwarded-For": "203.0.113.7"})
            assert status == 429, body
            assert body["error"] == "too_many_connections"
            # another client behind the same proxy has its own count
            status, body, _ = await get(http, url, {"X-Forwarded-For": "203.0.113.8"})
            assert status == 200, body
        log = await closed_remotes(broker, "203.0.113.7", "203.0.113.8")

        # Over IPv6 the same socket's peer is ::1, not a trusted proxy: its
        # X-Forwarded-For is ignored and the peer is the key.
        v6_url = url.replace(f"http://127.0.0.1:{port}", f"http://[::1]:{port}")
        async with SSEClient.connect(v6_url, headers={"X-Forwarded-For": "203.0.113.7"}) as s:
            assert s.status == 200, await s.text()
            await s.wait_for(lambda st: "ok" in st.parser.comments, what="the preamble")
            status, body, _ = await get(http, v6_url, {"X-Forwarded-For": "203.0.113.9"})
            assert status == 429, body
        # The proxy itself, without the header, is logged as IPv4.
        assert (await get(http, url))[0] == 200
        log = await closed_remotes(broker, "::1", "127.0.0.1")
        assert "::ffff:" not in log, log
    finally:
        listener.close()

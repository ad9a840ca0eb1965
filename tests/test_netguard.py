"""The address policy: which resolved addresses downloads may connect to."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from tornado.netutil import Resolver

from tasks.netguard import (
    AddressPolicy,
    AddressRefused,
    GuardedResolver,
    embedded_ipv4,
    is_internal,
)

INTERNAL = [
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.255",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.19.255.255",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::8.8.8.8",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a9fe:a9fe",
    "64:ff9b:1:ab::808:808",  # local-use NAT64 in a layout other than /96: unreadable, refused
    "100::1",  # discard-only
    "2001:db8::1",
    "2001:2::1",  # benchmarking
    "2001:10::1",  # ORCHID
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",
    "2002:c0a8:101::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:a00:1::f5ff:fffe",  # Teredo with server 10.0.0.1
    "3fff::1",
    "5f00::1",  # SRv6 SIDs
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
]

PUBLIC = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.0.3.1",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "64:ff9b:1::808:808",
    "2002:808:808::1",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo, client 8.8.8.8
]


@pytest.mark.parametrize("text", INTERNAL)
def test_internal(text: str) -> None:
    assert is_internal(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", PUBLIC)
def test_public(text: str) -> None:
    assert not is_internal(ipaddress.ip_address(text))


@pytest.mark.parametrize(
    ("text", "carried"),
    [
        ("::ffff:127.0.0.1", ["127.0.0.1"]),
        ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),
        ("64:ff9b:1::a00:1", ["10.0.0.1"]),
        ("2002:7f00:1::", ["127.0.0.1"]),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", ["65.54.227.120", "127.0.0.1"]),
        ("2606:4700:4700::1111", []),
        ("64:ff9b:1:ab::808:808", []),
    ],
)
def test_embedded_ipv4(text: str, carried: list[str]) -> None:
    address = ipaddress.IPv6Address(text)
    assert [str(inner) for inner in embedded_ipv4(address)] == carried


def test_policy_parses_every_entry_kind() -> None:
    policy = AddressPolicy.parse(
        [" Files.Example.com ", "127.0.0.1:8080", "[::1]:9000", "::1", "10.0.0.0/8", "", "fd00::/8"]
    )
    assert policy.hosts == {"files.example.com", "::1"}
    assert policy.host_ports == {("127.0.0.1", 8080), ("::1", 9000)}
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "fd00::/8"]


@pytest.mark.parametrize("entry", ["host:0", "host:70000", "host:http", "10.0.0.0/33", "x/8"])
def test_policy_rejects_malformed_entries(entry: str) -> None:
    with pytest.raises(ValueError, match=r"bad port|does not appear to be"):
        AddressPolicy.parse([entry])


def test_policy_opens_hosts_as_written() -> None:
    policy = AddressPolicy.parse(["localhost", "127.0.0.1:8080"])
    assert policy.opens_host("LOCALHOST", 1)
    assert policy.opens_host("127.0.0.1", 8080)
    assert not policy.opens_host("127.0.0.1", 8081)
    assert not policy.opens_host("127.1", 8080)
    assert not policy.opens_host("2130706433", 8080)
    assert not policy.opens_host("localhost.", 1)


def test_policy_permits_public_and_listed_networks() -> None:
    policy = AddressPolicy.parse(["10.1.0.0/16"])
    assert policy.permits(ipaddress.ip_address("8.8.8.8"))
    assert policy.permits(ipaddress.ip_address("10.1.2.3"))
    assert not policy.permits(ipaddress.ip_address("10.2.0.1"))
    assert not policy.permits(ipaddress.ip_address("::ffff:10.1.2.3"))  # v4 networks stay v4


class FakeResolver(Resolver):
    """Answers from a table, never the network."""

    def initialize(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        self.asked.append(host)
        return [
            (socket.AF_INET6, (a, port, 0, 0)) if ":" in a else (socket.AF_INET, (a, port))
            for a in self.answers[host]
        ]


ANSWERS = {
    "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"],
    "rebind.example": ["fe80::1%eth0"],
    "intranet": ["10.1.2.3"],
    "127.0.0.1": ["127.0.0.1"],
    "127.1": ["127.0.0.1"],
}


async def resolve(entries: list[str], host: str, port: int = 80) -> list[str]:
    """The addresses a guarded resolver hands to the client."""
    guard = GuardedResolver(policy=AddressPolicy.parse(entries), resolver=FakeResolver(ANSWERS))
    return [sockaddr[0] for _, sockaddr in await guard.resolve(host, port)]


async def test_resolver_passes_public_hosts() -> None:
    assert await resolve([], "public.example") == ["93.184.216.34", "2606:2800:220:1::1"]


@pytest.mark.parametrize(
    ("host", "address"),
    [("mixed.example", "10.0.0.5"), ("rebind.example", "fe80::1%eth0"), ("127.1", "127.0.0.1")],
)
async def test_resolver_refuses_any_internal_answer(host: str, address: str) -> None:
    with pytest.raises(AddressRefused) as caught:
        await resolve(["127.0.0.1"], host)
    assert str(caught.value) == f"resolves to an internal address ({address})"


async def test_resolver_opens_allowlisted_hosts_ports_and_networks() -> None:
    assert await resolve(["INTRANET"], "intranet") == ["10.1.2.3"]
    assert await resolve(["127.0.0.1:8080"], "127.0.0.1", 8080) == ["127.0.0.1"]
    with pytest.raises(AddressRefused):
        await resolve(["127.0.0.1:8080"], "127.0.0.1", 8081)
    assert await resolve(["10.1.0.0/16"], "intranet") == ["10.1.2.3"]
    with pytest.raises(AddressRefused):
        await resolve(["10.2.0.0/16"], "intranet")

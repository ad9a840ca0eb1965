"""Where archive downloads may connect: public addresses, plus what FETCH_ALLOWLIST opens."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tornado.netutil import DefaultLoopResolver, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Spelled out rather than taken from ipaddress.is_global/is_private, whose tables differ between
# Python patch releases; this is the IANA special-purpose registry as of 2024.
_INTERNAL_V4 = _networks(
    "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host on Linux
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared address space (carrier-grade NAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, home of cloud metadata services
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, including the broadcast 255.255.255.255
)
# Global unicast is only ever allocated from 2000::/3; everything else (loopback, unspecified,
# IPv4-compatible, unique-local, link-local, site-local, multicast, discard) is internal.
_GLOBAL_V6 = ipaddress.IPv6Network("2000::/3")
_INTERNAL_V6 = _networks(
    "2001::/23",  # IETF protocol assignments (Teredo, 2001::/32, is judged by its IPv4 first)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# Only the /96 layout of the local-use NAT64 prefix puts the IPv4 where we can read it
# unambiguously (bits 48-95 zero); any other layout stays refused as outside 2000::/3.
_NAT64_LOCAL_MIDDLE = ((1 << 48) - 1) << 32


class AddressRefused(Exception):
    """A host resolved to an address that downloads may not reach."""

    def __init__(self, address: str) -> None:
        super().__init__(f"resolves to an internal address ({address})")
        self.address = address


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo), if any."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _NAT64:
        return (low,)
    if address in _NAT64_LOCAL and not int(address) & _NAT64_LOCAL_MIDDLE:
        return (low,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo  # the relay server and the (de-obfuscated) client
    return ()


def is_internal(address: IPAddress) -> bool:
    """Whether the address is private, loopback, link-local, reserved or otherwise not public."""
    if isinstance(address, ipaddress.IPv4Address):
        return any(address in network for network in _INTERNAL_V4)
    carried = embedded_ipv4(address)
    if carried:
        return any(is_internal(inner) for inner in carried)
    if address not in _GLOBAL_V6:
        return True
    return any(address in network for network in _INTERNAL_V6)


def parse_address(text: str) -> IPAddress:
    """An address from a resolver's sockaddr host, without any IPv6 zone (`fe80::1%eth0`)."""
    return ipaddress.ip_address(text.partition("%")[0])


@dataclass(frozen=True)
class AddressPolicy:
    """The FETCH_ALLOWLIST: host names, host:port pairs and networks let through."""

    hosts: frozenset[str] = frozenset()
    host_ports: frozenset[tuple[str, int]] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressPolicy:
        """Build from entries `host`, `host:port` (`[v6]:port`) or CIDR; ValueError if malformed."""
        hosts: set[str] = set()
        host_ports: set[tuple[str, int]] = set()
        networks: list[IPNetwork] = []
        for entry in (text.strip().lower() for text in entries):
            if "/" in entry:
                networks.append(ipaddress.ip_network(entry, strict=False))
            elif entry:
                host, port = _split_entry(entry)
                if port is None:
                    hosts.add(host)
                else:
                    host_ports.add((host, port))
        return cls(frozenset(hosts), frozenset(host_ports), tuple(networks))

    def opens_host(self, host: str, port: int) -> bool:
        """Whether the URL's host, as written, is allowlisted (on this port)."""
        host = host.lower()
        return host in self.hosts or (host, port) in self.host_ports

    def permits(self, address: IPAddress) -> bool:
        """Whether a resolved address may be connected to."""
        return not is_internal(address) or any(address in net for net in self.networks)


def _split_entry(entry: str) -> tuple[str, int | None]:
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", entry)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, None  # a bare name, IPv4 or unbracketed IPv6 address
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in allowlist entry {entry!r}")
    return host, int(port)


class GuardedResolver(Resolver):
    """A resolver that refuses internal addresses, so no hop of a download can reach one."""

    def initialize(self, policy: AddressPolicy, resolver: Resolver | None = None) -> None:
        """Wrap `resolver` (the default loop resolver if None) with `policy`."""
        self.policy = policy
        self._own = resolver is None
        self._resolver: Resolver = resolver or DefaultLoopResolver()

    def close(self) -> None:
        """Close the wrapped resolver if this one created it."""
        if self._own:
            self._resolver.close()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        """Resolve, then refuse unless every address is public or allowlisted."""
        addresses = await self._resolver.resolve(host, port, family)
        if self.policy.opens_host(host, port):
            return addresses
        for _family, sockaddr in addresses:
            if not self.policy.permits(parse_address(sockaddr[0])):
                raise AddressRefused(sockaddr[0])
        return addresses

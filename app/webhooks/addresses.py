"""Where a webhook may go: https to public addresses, checked after DNS resolution. With the server's
webhook_allow_private, private, loopback and link-local addresses are allowed too, and plain http to
them. The sender resolves again before each POST and connects to the address it checked (a name that
re-resolves to an internal address between the check and the connection gains nothing)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class WebhookRefused(ValueError):
    """A webhook URL this server will not call; the message is for the user."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (the Host header and TLS SNI keep the name)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return parts._replace(netloc=f"{host}:{self.port}").geturl()

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return [str(info[4][0]).split("%")[0] for info in infos]


def _internal(address: IPAddress) -> bool:
    return address.is_private or address.is_loopback or address.is_link_local


def check_url(url: str, allow_private: bool, resolver: Resolver = system_resolver) -> Target:
    """The target to connect to, or WebhookRefused saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise WebhookRefused("expected an https:// URL with a host name")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("a webhook URL may not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("the port is not a number from 0 to 65535") from None
    found = resolver(parts.hostname, port)
    if not found:
        raise WebhookRefused(f"{parts.hostname} does not resolve")
    addresses: list[IPAddress] = []
    for text in found:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        addresses.append(address)
    for address in addresses:
        public = address.is_global and not address.is_multicast
        if not public and not (allow_private and _internal(address)):
            raise WebhookRefused(f"{parts.hostname} resolves to {address}, a private, loopback, link-local or "
                                 "reserved address; webhooks go to public addresses only on this server")
    if parts.scheme == "http" and not (allow_private and all(_internal(a) for a in addresses)):
        raise WebhookRefused("webhooks use https (plain http only to private addresses, where the server allows them)")
    return Target(url=url, scheme=parts.scheme, host=parts.hostname, port=port, address=addresses[0])

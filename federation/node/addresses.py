"""The addresses a node advertises when none are configured: the listen host, or every interface."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..discovery import interface_addresses


def derive_locations(
    listen: str, port: int, *, tls: bool, interfaces: list[str] | tuple[str, ...]
) -> list[str]:
    """`grpc[+tls]://HOST:PORT` for a specific listen host, else for every non-loopback address of
    the wanted interfaces (all when none are named); loopback only when there is nothing else."""
    if not port:
        return []
    scheme = "grpc+tls" if tls else "grpc"
    host = urlsplit(listen).hostname or ""
    if host not in ("0.0.0.0", "::", ""):
        h = f"[{host}]" if ":" in host else host
        return [f"{scheme}://{h}:{port}"]
    ips: list[str] = []
    wanted = set(interfaces)
    for name, addrs in interface_addresses().items():
        for ip in addrs:
            if ip.startswith("127."):
                continue
            if wanted and name not in wanted and ip not in wanted:
                continue
            ips.append(ip)
    return [f"{scheme}://{ip}:{port}" for ip in ips] or [f"{scheme}://127.0.0.1:{port}"]


__all__ = ["derive_locations"]

"""Rendezvous stores for the torch.distributed groups dsarl forms between Ray actors.

A `TCPStore` whose server picks its own socket listens on every interface (`::`), even when its host
name is 127.0.0.1. The host rank instead binds a socket to its node's Ray address (127.0.0.1 when Ray
runs on loopback only, see launch/ray_setup.py; the node IP on a cluster) and hands the store that
socket, so the rendezvous is reachable exactly where the Ray node is. Binding first also reserves the
port: no window between choosing a free port and listening on it.
"""
import datetime
import socket

import torch.distributed as dist


class StoreHost:
    """The host rank's listening socket, kept open until the store takes it over."""

    def __init__(self, host: str | None = None):
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host, self.port = host, self.sock.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def store(self, world_size: int, timeout_s: float = 600.0) -> dist.TCPStore:
        """The store, serving from this socket. The store owns the descriptor from here on (it closes it
        when it goes), so the Python socket lets go of it: closing it twice would close whatever socket
        reused the number in between."""
        fd = self.sock.detach()
        try:
            return dist.TCPStore(self.host, self.port, world_size, is_master=True,
                                 timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                                 master_listen_fd=fd)
        except BaseException:
            socket.close(fd)
            raise


def client_store(host: str, port: int, world_size: int, timeout_s: float = 600.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def join_store(host: StoreHost | None, address: tuple[str, int], world_size: int,
               timeout_s: float = 600.0) -> dist.TCPStore:
    """The store for one rank: served from `host` on the rank that holds it, a client elsewhere."""
    if host is not None:
        return host.store(world_size, timeout_s)
    return client_store(*address, world_size, timeout_s)

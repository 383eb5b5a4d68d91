"""Issue #21 item 9: a run dsarl starts on one machine listens on loopback only.

A real `dsarl grpo` run (two learner ranks and the broadcast weight sync, so both torch.distributed
rendezvous are included) runs in a child process; while it runs, the test lists every listening TCP
socket of that process tree from /proc and asserts each is bound to a loopback address. Before the fix, the dashboard agent's HTTP
server (job API routes) and the runtime-env agent listened on the machine's external address, three
Prometheus metrics ports on 0.0.0.0 and every gRPC server on `::`.
"""
import ipaddress
import os
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
import psutil

from cli_runs import start_cli, write_tiny_run


def _listening_inodes() -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket on this machine (IPv4 and IPv6)."""
    out = {}
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = ipaddress.IPv6Address(raw)
                addr = addr.ipv4_mapped or addr
            else:
                addr = ipaddress.IPv4Address(raw[::-1])
            out[int(fields[9])] = (str(addr), int(hex_port, 16))
    return out


def listening_sockets(root_pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket owned by root_pid's process tree."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    inodes = _listening_inodes()
    found = set()
    for p in procs:
        try:
            fds = os.listdir(f"/proc/{p.pid}/fd")
            name = p.name()
        except (FileNotFoundError, PermissionError, psutil.NoSuchProcess):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    found.add((*inodes[inode], name))
    return found


def test_listing_sees_a_socket_on_every_interface():
    """The probe itself can fail: a socket bound to 0.0.0.0 in this process is listed as 0.0.0.0."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ("0.0.0.0", port) in {(a, p) for a, p, _ in listening_sockets(os.getpid())}


@pytest.mark.slow
def test_a_grpo_run_listens_on_loopback_only(tmp_path):
    config = write_tiny_run(tmp_path, extra="learner_ranks: 2\nsave_every: 3\nsync: {method: broadcast}")
    proc = start_cli("grpo", str(config))
    seen = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= listening_sockets(proc.pid)
        time.sleep(0.3)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert len(seen) >= 5, seen  # GCS, raylet, workers, agents, learner rendezvous: the probe saw the run
    exposed = sorted(s for s in seen if not ipaddress.ip_address(s[0]).is_loopback)
    assert not exposed, f"listening beyond loopback: {exposed}"

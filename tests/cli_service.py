"""`pv-ray serve` as a user starts it: a subprocess in a session of its own, ready once it prints
where it serves; stopped with Ctrl-C (SIGINT to its process group) or as `kill` does (SIGTERM to
it), then killed if it lingers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

PV_RAY = str(Path(sys.executable).with_name("pv-ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PvRayService:
    """`pv-ray serve <args> --port <free port>` running until `stop()`."""

    def __init__(self, args: list[str], cwd: Path | None = None, env: dict | None = None, ready_timeout_s: float = 300):
        self.port = free_port()
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [PV_RAY, "serve", *args, "--port", str(self.port)],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout_s
        while not any("serving on" in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pv-ray serve did not come up:\n" + "".join(self.lines))
            time.sleep(0.5)
        text = " ".join("".join(self.lines).split())
        self.url = re.search(r"serving on (http://\S+?) ", text).group(1)
        self.ray_address = re.search(r"Ray at (\S+?);", text).group(1)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        if self.process.poll() is None:
            if sig == signal.SIGINT:
                os.killpg(self.process.pid, sig)  # a terminal's Ctrl-C reaches the whole group
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> PvRayService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def live_processes_in_group(pgid: int) -> list[str]:
    """Command lines of the processes (zombies left out) still in process group `pgid`: what a
    service started in its own session left running."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            found.append(cmdline.strip())
    return found


def responds(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def running(
    command: list[str], cwd: Path, ready_url: str, stop: signal.Signals, timeout_s: float = 300
) -> Iterator[None]:
    """A server command (`serve run`, `mlflow ui`) started in a session of its own, ready once
    `ready_url` answers 200; stopped by `stop` to its process group, killed if it lingers."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not responds(ready_url):
            assert process.poll() is None and time.monotonic() < deadline, f"{command[:2]} did not come up"
            time.sleep(1)
        yield
    finally:
        os.killpg(process.pid, stop)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

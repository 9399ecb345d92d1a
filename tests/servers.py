"""Start the real app (``python app.py``) on a free loopback port, and stop it with SIGTERM.

Used by the server tests and by benchmarks/service_bench.py, so both drive the app the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    """GET a URL; returns (status, body) also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    outputs: Path
    log_path: Path
    health_seen: list
    ready_s: float | None = None  # spawn to the first /healthz 200

    def health(self) -> tuple[int, dict]:
        status, body = get(self.url + "healthz")
        return status, json.loads(body)

    def metric(self, name: str) -> float:
        _, text = get(self.url + "metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, data_dir: Path, *args: str, env: dict | None = None, wait_ready: bool = True,
                 timeout: float = 120) -> Server:
    port = free_port()
    outputs = tmp / "outputs"
    log_path = tmp / f"app-{port}.log"
    started = time.perf_counter()
    environ = {**os.environ, "ZIMAGE_DATA_DIR": str(data_dir), "ZIMAGE_OUTPUTS_DIR": str(outputs),
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(tmp / "gradio-cache"),
               **(env or {})}
    log_file = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port), *args], cwd=ROOT,
                            env=environ, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}/", outputs, log_path, [])
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited with {proc.returncode}:\n{server.log()}")
            try:
                status, body = server.health()
                server.health_seen.append((status, body.get("status")))
                if status == 200:
                    server.ready_s = time.perf_counter() - started
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        else:
            server.stop()
            raise RuntimeError(f"app not ready in {timeout} s:\n{server.log()}")
    return server

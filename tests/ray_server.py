"""Start ``python -m zimage serve-ray`` (a local Ray instance with the demo model) on a free loopback port, and
stop it with SIGTERM. Used by tests/test_ray.py and benchmarks/ray_bench.py, so both drive it the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import free_port, get  # noqa: E402

#: What serve-ray prints once every replica is up.
READY_LINE = "serving the REST API on"


@dataclass
class RayServer:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/
    outputs: Path
    log_path: Path
    ready_s: float | None = None  # spawn to READY_LINE
    seen_pids: set = field(default_factory=set)  # every process of its tree seen so far (Ray's processes)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def processes(self) -> list:
        """The live processes under serve-ray (Ray's GCS, raylet, agents, controller, proxy, replicas); remembered
        in ``seen_pids`` for the check that none outlives the stop."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update((child.pid, child.create_time()) for child in children)
        return children

    def replica_processes(self) -> list:
        """The replicas' worker processes (Ray names them ``ray::ServeReplica:<app>:<deployment>``)."""
        found = []
        for process in self.processes():
            try:
                if "ServeReplica" in " ".join(process.cmdline()):
                    found.append(process)
            except Exception:  # noqa: BLE001 - gone meanwhile
                continue
        return found

    def leftovers(self) -> list[int]:
        """PIDs of processes seen under serve-ray that still run (same PID and start time)."""
        import psutil

        alive = []
        for pid, created in self.seen_pids:
            try:
                if psutil.Process(pid).create_time() == created:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return alive

    def stop(self, timeout: float = 90) -> int:
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_ray_server(tmp: Path, data_dir: Path, *args: str, env: dict | None = None, timeout: float = 240
                     ) -> RayServer:
    """Run ``python -m zimage serve-ray --demo --port P *args`` from the repository and wait until it serves (its
    READY_LINE and /healthz 200). Raises RuntimeError with the log when it exits or is not ready in ``timeout``
    seconds."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    outputs = tmp / "outputs"
    log_path = tmp / f"serve-ray-{port}.log"
    environ = {**os.environ, "ZIMAGE_DATA_DIR": str(data_dir), "ZIMAGE_OUTPUTS_DIR": str(outputs),
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **(env or {})}
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "zimage", "serve-ray", "--demo", "--port", str(port), *args],
                                cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
    server = RayServer(proc, f"http://127.0.0.1:{port}/", outputs, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-ray exited with {proc.returncode}:\n{server.log()[-6000:]}")
        if READY_LINE in server.log():
            try:
                if get(server.url + "healthz")[0] == 200:
                    server.ready_s = time.perf_counter() - started
                    server.processes()
                    return server
            except OSError:
                pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"serve-ray not ready in {timeout} s:\n{server.log()[-6000:]}")

#!/usr/bin/env python3
"""Service benchmark on the demo model (any machine, no GPU needed).

Measures, in one run, against the real app (``python app.py --demo``) started as a subprocess:

* overhead: median latency of a 512x512 generation called directly on a GenerationService in this
  process versus through the app's HTTP API (gradio_client), same parameters, runs interleaved;
* queue utilisation with 1, 4, 8 and 16 concurrent clients: images/min, p50/p95 latency, and the
  busy fraction (seconds the pipeline spent generating, from the app's own /metrics, over wall time);
* soak: sequential generations through the API, server RSS (and GPU memory where there is one) at
  checkpoints, growth in MB;
* cold start: process start to /healthz 200, next to the bare pipeline load time.

Writes ``<out>/service-<date>.json`` and a latency plot ``<out>/service-<date>.png``, and prints a
markdown table. ``--quick`` (under 2 minutes on a 2-core machine) is run by the test suite.

    python benchmarks/service_bench.py            # full run, results in benchmarks/results/
    python benchmarks/service_bench.py --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servers import start_server  # noqa: E402


@dataclass(frozen=True)
class Config:
    """How much of each measurement a run does."""

    overhead_runs: int
    overhead_size_px: int
    queue_clients: tuple[int, ...]
    queue_requests_per_client: int
    queue_size_px: int
    soak_runs: int
    soak_checkpoints: tuple[int, ...]
    soak_size_px: int
    steps: int = 8


FULL = Config(overhead_runs=15, overhead_size_px=512, queue_clients=(1, 4, 8, 16), queue_requests_per_client=3,
              queue_size_px=1024, soak_runs=200, soak_checkpoints=(10, 100, 200), soak_size_px=512)
QUICK = Config(overhead_runs=3, overhead_size_px=512, queue_clients=(1, 4, 8, 16), queue_requests_per_client=1,
               queue_size_px=256, soak_runs=20, soak_checkpoints=(2, 10, 20), soak_size_px=256)


# --- The app as a subprocess ---------------------------------------------------------------------

class App:
    """``app.py --demo`` on a loopback port (tests/servers.py starts it); records spawn to /healthz 200."""

    def __init__(self, data_dir: Path, work: Path, queue_size: int) -> None:
        self.server = start_server(work, data_dir, "--queue-size", str(queue_size), timeout=300)
        self.url = self.server.url
        self.proc = self.server.proc
        self.cold_start_s = self.server.ready_s

    def metric(self, name: str) -> float | None:
        try:
            return self.server.metric(name)
        except KeyError:
            return None

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 1e6

    def client(self, work: Path):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=str(work / "downloads"))

    def stop(self) -> None:
        self.server.stop()


# --- Measurements ----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def measure_overhead(app: App, service, cfg: Config, work: Path) -> dict:
    from zimage.service import GenerationRequest

    side = cfg.overhead_size_px
    client = app.client(work)
    request = GenerationRequest(prompt="a lighthouse at dusk", width=side, height=side, steps=cfg.steps, seed=1)
    # One warm-up each: first calls pay for lazy initialisation.
    service.generate(request)
    client.predict(request.prompt, side, side, cfg.steps, 1, 1, api_name="/generate")
    direct, api = [], []
    for _ in range(cfg.overhead_runs):  # interleaved, so drift hits both alike
        started = time.perf_counter()
        service.generate(request)
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        client.predict(request.prompt, side, side, cfg.steps, 1, 1, api_name="/generate")
        api.append(time.perf_counter() - started)
    direct_median, api_median = statistics.median(direct), statistics.median(api)
    return {"size_px": side, "steps": cfg.steps, "runs": cfg.overhead_runs,
            "direct_median_s": direct_median, "api_median_s": api_median,
            "api_over_direct": api_median / direct_median, "api_extra_s": api_median - direct_median,
            "direct_s": direct, "api_s": api}


def measure_queue(app: App, cfg: Config, work: Path) -> list[dict]:
    side = cfg.queue_size_px
    rows = []
    for clients in cfg.queue_clients:
        handles = [app.client(work) for _ in range(clients)]  # connected before the clock starts
        latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            for n in range(cfg.queue_requests_per_client):
                started = time.perf_counter()
                try:
                    handles[index].predict("a busy street", side, side, cfg.steps, index * 100 + n, 1,
                                           api_name="/generate")
                except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

        busy_before = app.metric("zimage_generation_seconds_sum") or 0.0
        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        busy = (app.metric("zimage_generation_seconds_sum") or 0.0) - busy_before
        rows.append({"clients": clients, "size_px": side, "images": len(latencies), "failures": failures,
                     "wall_s": wall, "images_per_min": 60 * len(latencies) / wall,
                     "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
                     "busy_fraction": busy / wall})
    return rows


def measure_soak(app: App, cfg: Config, work: Path) -> dict:
    side = cfg.soak_size_px
    client = app.client(work)
    points = []
    for n in range(1, cfg.soak_runs + 1):
        client.predict("soak", side, side, cfg.steps, n, 1, api_name="/generate")
        if n in cfg.soak_checkpoints:
            points.append({"after": n, "rss_mb": app.rss_mb(),
                           "gpu_allocated_mb": (app.metric("zimage_gpu_allocated_memory_bytes") or 0) / 1e6})
    first, last = points[0], points[-1]
    return {"size_px": side, "runs": cfg.soak_runs, "points": points,
            "rss_growth_mb": last["rss_mb"] - first["rss_mb"],
            "gpu_growth_mb": last["gpu_allocated_mb"] - first["gpu_allocated_mb"]}


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


# --- Report ---------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    o, c, s = result["overhead"], result["cold_start"], result["soak"]
    m = result["machine"]
    lines = [
        f"Service benchmark, {result['date']}, {m['cpu']} ({m['cores']} cores, {m['ram_gb']} GB RAM), "
        f"GPU: {m['gpu'] or 'none'}, torch {m['torch']}, demo model{' (quick run)' if result['quick'] else ''}.",
        "",
        f"| overhead, {o['size_px']}x{o['size_px']}, {o['steps']} steps, {o['runs']} interleaved runs | median |",
        "| --- | --- |",
        f"| direct service call | {o['direct_median_s']:.3f} s |",
        f"| HTTP API (gradio_client) | {o['api_median_s']:.3f} s |",
        f"| ratio API / direct | {o['api_over_direct']:.2f}x (+{o['api_extra_s'] * 1000:.0f} ms) |",
        "",
        "| clients | images | images/min | p50 | p95 | busy fraction | failures |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["queue"]:
        lines.append(f"| {row['clients']} | {row['images']} ({row['size_px']}px) | {row['images_per_min']:.1f} | "
                     f"{row['p50_s']:.2f} s | {row['p95_s']:.2f} s | {row['busy_fraction']:.2f} | "
                     f"{len(row['failures'])} |")
    lines += ["", "| soak, sequential API calls | " + " | ".join(f"after {p['after']}" for p in s["points"]) + " |",
              "| --- |" + " --- |" * len(s["points"]),
              "| server RSS | " + " | ".join(f"{p['rss_mb']:.0f} MB" for p in s["points"]) + " |",
              f"| growth first to last checkpoint | {s['rss_growth_mb']:+.1f} MB RSS, {s['gpu_growth_mb']:+.1f} MB GPU |",
              "",
              "| cold start | seconds |", "| --- | --- |",
              f"| process start to /healthz 200 | {c['process_to_healthy_s']:.1f} |",
              f"| new interpreter: import diffusers + load the pipeline | {c['fresh_process_import_and_load_s']:.1f} |",
              f"| pipeline load alone (imports already done) | {c['pipeline_load_s']:.2f} |"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["queue"]
    clients = [r["clients"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(clients, [r["p50_s"] for r in rows], marker="o", label="p50")
    ax.plot(clients, [r["p95_s"] for r in rows], marker="s", label="p95")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(f"latency per request (s), {rows[0]['size_px']}px")
    ax.set_xticks(clients)
    ax.set_title(f"Queue latency, demo model, {result['machine']['cores']}-core CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FRESH_LOAD = """
import sys, time
started = time.perf_counter()
from diffusers import ZImagePipeline
import torch
ZImagePipeline.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(time.perf_counter() - started)
"""


def _fresh_process_load_s(data_dir: Path) -> float:
    """Import diffusers and load the demo pipeline in a new interpreter: the floor under the app's cold start."""
    from zimage.demo_model import ensure_demo_model

    folder = ensure_demo_model(data_dir)
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder)], capture_output=True, text=True,
                          check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(done.stdout.strip().splitlines()[-1])


def run(cfg: Config, out: Path, quick: bool, data_dir: Path) -> dict:
    from zimage.demo_model import ensure_demo_model
    from zimage.logs import configure_logging
    from zimage.service import GenerationService
    from zimage.settings import Settings

    configure_logging("WARNING")
    ensure_demo_model(data_dir)  # built once, so cold start measures starting, not building
    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as tmp:
        work = Path(tmp)
        service = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=work / "direct"))
        started = time.perf_counter()
        service.load()
        load_s = time.perf_counter() - started
        queue_size = max(cfg.queue_clients) * max(1, cfg.queue_requests_per_client) + 4
        print(f"starting the app (queue size {queue_size}) ...", file=sys.stderr)
        app = App(data_dir, work, queue_size)
        try:
            print("overhead ...", file=sys.stderr)
            overhead = measure_overhead(app, service, cfg, work)
            print("queue ...", file=sys.stderr)
            queue = measure_queue(app, cfg, work)
            print("soak ...", file=sys.stderr)
            soak = measure_soak(app, cfg, work)
        finally:
            app.stop()
    fresh_load_s = _fresh_process_load_s(data_dir)
    date = time.strftime("%Y-%m-%d")
    result = {"date": date, "quick": quick, "machine": machine(), "config": cfg.__dict__,
              "overhead": overhead, "queue": queue, "soak": soak,
              "cold_start": {"process_to_healthy_s": app.cold_start_s, "pipeline_load_s": load_s,
                             "fresh_process_import_and_load_s": fresh_load_s}}
    out.mkdir(parents=True, exist_ok=True)
    stem = f"service-{date}{'-quick' if quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=list))
    plot(result, out / f"{stem}.png")
    result["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.png")]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A short run (under 2 minutes) for smoke tests.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="Folder for the JSON and the plot (default benchmarks/results).")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "scratch" / "data",
                        help="Where the demo model is built once and reused.")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="Markdown file to put the tables in (default: benchmarks/RESULTS.md for a full run, "
                             "none for --quick).")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(QUICK if args.quick else FULL, args.out, args.quick, args.data_dir)
    table = markdown(result)
    results_md = args.results_md or (None if args.quick else ROOT / "benchmarks" / "RESULTS.md")
    if results_md is not None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from results_md import write_section

        write_section(results_md, "service-bench", "### Service on the demo model\n\n" + table)
        result["files"].append(str(results_md))
    print(table)
    print(f"\nwritten: {', '.join(result['files'])} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Throughput of the Ray Serve deployment (``python -m zimage serve-ray``) with 1 and 2 replicas, on the demo model.

For each replica count, a local Ray instance is started with that many replicas of the demo model, the machine's
CPUs split evenly between them (``--replica-cpus``: PyTorch runs that many threads in each), and ``--clients``
concurrent clients each send ``--images-per-client`` requests of one ``--size`` x ``--size`` image with ``--steps``
steps to ``POST /v1/images/generations`` (b64_json), one after the other, after a warm-up request per replica.
Reported per run: images/min (images over the wall time from the first request to the last answer), the p50/p95
latency of a request, failures, and how many images each replica made; and the speedup of 2 replicas over 1 at
the same number of clients. Prints a table and writes ``<out>/ray-<date>.json`` and a section of
``benchmarks/RESULTS.md``.

    python benchmarks/ray_bench.py              # 1 and 2 replicas x 4 and 8 clients, 512x512, 8 steps
    python benchmarks/ray_bench.py --quick      # one small run, no RESULTS.md

On a CPU the replicas share the same cores: 2 replicas of 1 thread each against 1 replica of 2 threads measures
how well the work splits, not what a second GPU adds. On GPUs (one per replica) the expectation is close to N times
one replica; that needs a machine with GPUs to measure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "a lighthouse at dawn, oil painting"


def post_generation(url: str, size_px: int, steps: int, seed: int, timeout_s: float = 600) -> tuple[int, str, float]:
    """One ``POST /v1/images/generations``: (HTTP status, replica id or "", seconds)."""
    body = json.dumps({"prompt": PROMPT, "size": f"{size_px}x{size_px}", "steps": steps, "seed": seed}).encode()
    request = urllib.request.Request(url + "v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read()
            return answer.status, answer.headers.get("x-zimage-replica", ""), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, exc.headers.get("x-zimage-replica", "") or "", time.perf_counter() - started


def measure(url: str, *, clients: int, images_per_client: int, size_px: int, steps: int) -> dict:
    """``clients`` threads, each sending ``images_per_client`` requests one after the other to the deployment at
    ``url``; returns images, failures, wall_s, images_per_min, p50_s, p95_s and per_replica (images per replica)."""
    def client(index: int) -> list[tuple[int, str, float]]:
        return [post_generation(url, size_px, steps, seed=index * 1000 + n) for n in range(images_per_client)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = [answer for answers in pool.map(client, range(clients)) for answer in answers]
    wall_s = time.perf_counter() - started
    ok = [answer for answer in answers if answer[0] == 200]
    latencies = sorted(seconds for _, _, seconds in ok)
    per_replica: dict[str, int] = {}
    for _, replica, _ in ok:
        per_replica[replica] = per_replica.get(replica, 0) + 1
    return {"clients": clients, "images": len(ok), "failures": len(answers) - len(ok), "wall_s": round(wall_s, 2),
            "images_per_min": round(len(ok) / wall_s * 60, 1),
            "p50_s": round(statistics.median(latencies), 2) if latencies else None,
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2) if latencies else None,
            "per_replica": per_replica}


def hop_overhead(url: str, *, runs: int, size_px: int, steps: int) -> dict:
    """What Ray adds to one request: ``runs`` sequential requests, the median of their wall time minus the
    service's own ``total_s`` (queue wait, encode, denoise, decode, save) reported in the answer, in seconds.
    The rest is HTTP, Ray's proxy and routing, the REST layer and the base64 PNG in the answer."""
    wall, server = [], []
    for run in range(runs):
        body = json.dumps({"prompt": PROMPT, "size": f"{size_px}x{size_px}", "steps": steps, "seed": run}).encode()
        request = urllib.request.Request(url + "v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as answer:
            data = json.loads(answer.read())
        wall.append(time.perf_counter() - started)
        server.append(data["data"][0]["timings"]["total_s"])
    return {"runs": runs, "wall_s": round(statistics.median(wall), 3), "server_total_s": round(
        statistics.median(server), 3), "overhead_s": round(statistics.median(w - s for w, s in zip(wall, server)), 3)}


def rss_mb(server) -> dict:
    """Resident memory (MiB) of the replicas and of Ray's own processes (GCS, raylet, agents, controller, proxy)
    under serve-ray, and of serve-ray itself. Sums of RSS: shared pages are counted in each process."""
    import psutil

    replicas, ray_own = 0, 0
    for process in server.processes():
        try:
            rss = process.memory_info().rss
            if "ServeReplica" in " ".join(process.cmdline()):
                replicas += rss
            else:
                ray_own += rss
        except psutil.Error:
            continue
    driver = psutil.Process(server.proc.pid).memory_info().rss
    return {"replicas": round(replicas / 2**20), "ray_processes": round(ray_own / 2**20),
            "serve_ray": round(driver / 2**20)}


def run_config(replicas: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Start serve-ray with ``replicas`` replicas, warm them up, measure each client count; stop it."""
    from ray_server import start_ray_server

    cores = os.cpu_count() or 1
    replica_cpus = max(cores / replicas, 0.5) if not args.replica_cpus else args.replica_cpus
    server = start_ray_server(work / f"replicas-{replicas}", work / "data", "--replicas", str(replicas),
                              "--replica-cpus", f"{replica_cpus:g}")
    rows = []
    try:
        warm = measure(server.url, clients=2 * replicas, images_per_client=1, size_px=args.size, steps=args.steps)
        print(f"{replicas} replica(s) ready in {server.ready_s:.1f} s; warm-up reached {len(warm['per_replica'])} "
              "replica(s)", file=sys.stderr)
        for clients in args.clients:
            load_before = os.getloadavg()[0]
            row = measure(server.url, clients=clients, images_per_client=args.images_per_client, size_px=args.size,
                          steps=args.steps)
            # The 1-minute load average before and after: other processes on the machine show up here (this run's own
            # replicas bring it to about the number of cores).
            row.update(replicas=replicas, replica_cpus=replica_cpus, torch_threads=max(int(replica_cpus), 1),
                       ready_s=round(server.ready_s or 0, 1), load_avg_1min=[round(load_before, 2),
                                                                               round(os.getloadavg()[0], 2)])
            print(f"  {clients} clients: {row['images_per_min']} images/min, per replica {row['per_replica']}",
                  file=sys.stderr)
            rows.append(row)
        rows[0]["memory_mb"] = rss_mb(server)
        if replicas == 1 and args.overhead_runs:
            rows[0]["hop"] = hop_overhead(server.url, runs=args.overhead_runs, size_px=args.size, steps=args.steps)
    finally:
        status = server.stop()
        if status != 0:
            print(f"warning: serve-ray exited with {status}:\n{server.log()[-3000:]}", file=sys.stderr)
    return rows


def table(report: dict) -> str:
    """The RESULTS.md section of ``report``."""
    machine = report["machine"]
    lines = [f"### Ray Serve scale-out, demo model, {report['size']}x{report['size']}, {report['steps']} steps "
             f"({report['date']})", "",
             f"{machine['cpu']}, {machine['cores']} cores, CPU only, ray {machine['ray']}; the cores split evenly "
             f"between the replicas (PyTorch threads per replica in the table); each client sends "
             f"{report['images_per_client']} request(s) in a row.", "",
             "| replicas | threads each | clients | images | images/min | p50 | p95 | failures | images per replica "
             "| load avg before, after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["runs"]:
        per = ", ".join(str(count) for count in sorted(row["per_replica"].values(), reverse=True))
        lines.append(f"| {row['replicas']} | {row['torch_threads']} | {row['clients']} | {row['images']} | "
                     f"{row['images_per_min']:.1f} | {row['p50_s']:.2f} s | {row['p95_s']:.2f} s | "
                     f"{row['failures']} | {per} | {row['load_avg_1min'][0]:.1f}, {row['load_avg_1min'][1]:.1f} |")
    for row in report["runs"]:
        if "hop" in row:
            hop = row["hop"]
            lines += ["", f"One request at a time (1 replica, {hop['runs']} requests): {hop['wall_s']:.3f} s at the "
                      f"client, of which the service's own time is {hop['server_total_s']:.3f} s: "
                      f"{hop['overhead_s'] * 1000:.0f} ms of HTTP, Ray's proxy and routing, the REST layer and the "
                      "base64 PNG."]
    memory = [(row["replicas"], row["memory_mb"]) for row in report["runs"] if "memory_mb" in row]
    if memory:
        lines += ["", "| replicas | RSS of the replicas | of Ray's own processes | of serve-ray |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {count} | {mb['replicas']} MiB | {mb['ray_processes']} MiB | {mb['serve_ray']} MiB |"
                  for count, mb in memory]
    if report["speedup"]:
        lines += ["", "| clients | 2 replicas / 1 replica |", "| --- | --- |"]
        lines += [f"| {clients} | {ratio:.2f}x |" for clients, ratio in report["speedup"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Replica counts to measure.")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8], help="Concurrent clients to measure.")
    parser.add_argument("--images-per-client", type=int, default=4, help="Requests each client sends in a row.")
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="CPUs per replica (default: this machine's cores divided by the replica count).")
    parser.add_argument("--overhead-runs", type=int, default=10,
                        help="Sequential requests for Ray's per-request overhead (with 1 replica; 0: skip).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 replica, 2 clients, 256 px, 2 steps; "
                                                              "no RESULTS.md.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.replicas, args.clients, args.images_per_client, args.size, args.steps = [1], [2], 1, 256, 2
        args.overhead_runs = 2
    import ray
    from results_md import cpu_name, write_section

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        from zimage.demo_model import ensure_demo_model

        ensure_demo_model(work / "data")
        for replicas in args.replicas:
            runs += run_config(replicas, args, work)
    by = {(row["replicas"], row["clients"]): row["images_per_min"] for row in runs}
    speedup = {clients: round(by[(2, clients)] / by[(1, clients)], 2) for clients in args.clients
               if (1, clients) in by and (2, clients) in by and by[(1, clients)]}
    date = time.strftime("%Y-%m-%d")
    report = {"date": date, "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ray": ray.__version__,
                                        "python": platform.python_version(), "gpu": None},
              "size": args.size, "steps": args.steps, "images_per_client": args.images_per_client, "runs": runs,
              "speedup": speedup}
    text = table(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ray-{date}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not args.quick:
        write_section(ROOT / "benchmarks" / "RESULTS.md", f"ray-{report['machine']['cpu']}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

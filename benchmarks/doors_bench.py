#!/usr/bin/env python3
"""What each front door adds to a job, on the demo model (any machine): the client's wall time minus the job's own
time in the server.

The real app (``app.py --demo``) runs as a subprocess on loopback; one job at a time goes through each door,
interleaved ``--runs`` times after a warm-up round:

* REST: ``POST /v1/images/generations`` with the official ``openai`` client (``b64_json``: the PNG comes back in the
  answer);
* Gradio's HTTP API as its documentation shows it with curl (``POST /gradio_api/call/generate``, then the event
  stream of ``GET /gradio_api/call/generate/EVENT_ID``), with ``httpx``, then a download of the PNG the answer names;
* Gradio API with ``gradio_client`` (the same endpoint; the client follows the event stream in its own threads and
  downloads the PNG to a folder);

and, for reference, the service called in this process (no door). The job's own time is ``total_s`` of its timings
(from its admission to its PNG written), which both doors return. Reported: per door the median of (wall - total_s)
and that cost as a share of the wall time. Prints a table and writes ``<out>/doors-<date>.json`` and a section of
``benchmarks/RESULTS.md``.

    python benchmarks/doors_bench.py                  # 1024x1024, 8 steps, 7 runs
    python benchmarks/doors_bench.py --size 512 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

API_KEY = "bench-key"
PROMPT = "a lighthouse at dawn"


def gradio_http_result(http, path: str) -> list:
    """The ``complete`` event's data of Gradio's documented event stream (``event: complete`` then ``data: [...]``);
    raises RuntimeError with the stream's ``error`` event."""
    with http.stream("GET", path) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"the Gradio event failed: {line[5:].strip()}")
                return json.loads(line[5:])
    raise RuntimeError("the Gradio event stream ended without a result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="Image side in pixels.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--runs", type=int, default=7, help="Measured runs of each door, interleaved.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 256 px, 2 steps, 1 run; no RESULTS.md.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.runs = 256, 2, 1
    import openai
    from gradio_client import Client
    from results_md import cpu_name, write_section
    from servers import start_server

    from zimage.logs import configure_logging

    configure_logging("WARNING")
    import httpx

    doors = ("rest", "gradio http", "gradio_client")
    costs: dict[str, list[float]] = {door: [] for door in doors}
    walls: dict[str, list[float]] = {door: [] for door in doors}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        server = start_server(work, work / "data", "--api-key", API_KEY)
        try:
            rest = openai.OpenAI(base_url=server.url + "v1", api_key=API_KEY, max_retries=0, timeout=600)
            gradio = Client(server.url, verbose=False, download_files=str(work / "downloads"))
            http = httpx.Client(base_url=server.url, timeout=600)

            def via_rest() -> float:
                answer = rest.images.generate(prompt=PROMPT, size=f"{args.size}x{args.size}",
                                              response_format="b64_json", extra_body={"steps": args.steps, "seed": 1})
                return answer.to_dict()["data"][0]["timings"]["total_s"]

            def via_gradio_client() -> float:
                _, info = gradio.predict(PROMPT, args.size, args.size, args.steps, 1, 1, api_name="/generate")
                return info["timings"]["total_s"]

            def via_gradio_http() -> float:
                event = http.post("gradio_api/call/generate", json={"data": [
                    PROMPT, args.size, args.size, args.steps, 1, 1, 0.0, "", None]}).json()["event_id"]
                result = gradio_http_result(http, f"gradio_api/call/generate/{event}")
                gallery, info = result
                http.get(gallery[0]["image"]["url"]).raise_for_status()  # the PNG, as a client would fetch it
                return info["timings"]["total_s"]

            ways = (("rest", via_rest), ("gradio http", via_gradio_http), ("gradio_client", via_gradio_client))
            for run in range(args.runs + 1):  # the first round warms each up and is not counted
                for label, call in ways:
                    started = time.perf_counter()
                    job_s = call()
                    wall = time.perf_counter() - started
                    if run:
                        walls[label].append(wall)
                        costs[label].append(wall - job_s)
        finally:
            http.close()
            server.stop()
    date = time.strftime("%Y-%m-%d")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count()}
    summary = {door: {"median_wall_s": statistics.median(walls[door]), "median_cost_s": statistics.median(costs[door]),
                      "cost_share": statistics.median(costs[door]) / statistics.median(walls[door])}
               for door in costs}
    report = {"date": date, "machine": machine, "size": args.size, "steps": args.steps, "runs": args.runs,
              "doors": summary, "costs_s": costs, "walls_s": walls}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"doors-{date}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = "\n".join([
        f"### What each front door adds to a job, demo model, {args.size}x{args.size}, {args.steps} steps ({date})", "",
        f"{machine['cpu']}, {machine['cores']} cores; median of {args.runs} interleaved runs. Cost: the client's wall "
        "time minus the job's own time in the server (its timings' total_s).", "",
        "| door | median wall | median cost | cost share |", "| --- | --- | --- | --- |",
        *[f"| {door} | {row['median_wall_s']:.3f} s | {row['median_cost_s'] * 1000:.0f} ms | "
          f"{row['cost_share']:.1%} |" for door, row in summary.items()]])
    print(table)
    if not args.quick:
        write_section(ROOT / "benchmarks" / "RESULTS.md", f"doors-{machine['cpu']}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

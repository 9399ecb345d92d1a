#!/usr/bin/env python3
"""What the OpenAI-compatible REST API adds over a direct service call, on the demo model (any machine).

Two ways to the same image, interleaved ``--runs`` times after one warm-up each:

* direct: ``GenerationService.generate`` in this process (validation, queue, encode, denoise, decode, save);
* REST: ``POST /v1/images/generations`` (``response_format="b64_json"``) to the real app (``app.py --demo``) on
  loopback, with the official ``openai`` client: JSON, the HTTP round trip, the same service, and the PNG read
  back and base64-encoded into the answer.

Reported: the medians of the wall time of each, their difference, and the protocol's own share (the REST wall
time minus the job's ``total_s`` in the server's answer). Both run on the same
cores, one at a time. Prints a table and writes ``<out>/rest-<date>.json`` and a section of
``benchmarks/RESULTS.md``.

    python benchmarks/rest_bench.py            # 512x512, 8 steps, 7 runs
    python benchmarks/rest_bench.py --quick    # a smoke run for the tests
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--runs", type=int, default=7, help="Measured runs of each way, interleaved.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 256 px, 2 steps, 1 run; no RESULTS.md.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.runs = 256, 2, 1
    import openai
    from results_md import cpu_name, write_section
    from servers import start_server

    from zimage.logs import configure_logging
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    configure_logging("WARNING")
    seconds: dict[str, list[float]] = {"direct": [], "rest": [], "rest_server": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        server = start_server(work, work / "data", "--api-key", API_KEY)
        service = GenerationService(Settings(demo=True, data_dir=work / "data", outputs_dir=work / "direct"))
        try:
            service.load()
            client = openai.OpenAI(base_url=server.url + "v1", api_key=API_KEY, max_retries=0, timeout=600)
            request = GenerationRequest(prompt="a lighthouse at dawn", width=args.size, height=args.size,
                                        steps=args.steps, seed=1)

            def direct() -> None:
                service.generate(request)

            def rest() -> float:
                answer = client.images.generate(prompt="a lighthouse at dawn", size=f"{args.size}x{args.size}",
                                                response_format="b64_json", extra_body={"steps": args.steps, "seed": 1})
                return answer.to_dict()["data"][0]["timings"]["total_s"]

            for run in range(args.runs + 1):  # the first round warms both up and is not counted
                for label, call in (("direct", direct), ("rest", rest)):
                    started = time.perf_counter()
                    server_s = call()
                    if run:
                        seconds[label].append(time.perf_counter() - started)
                        if server_s is not None:
                            seconds["rest_server"].append(server_s)
            profile = service.plan.describe()
        finally:
            service.close()
            server.stop()
    direct_s, rest_s = statistics.median(seconds["direct"]), statistics.median(seconds["rest"])
    # What the protocol adds to the same job: the client's wall time minus the job's own time in the server.
    protocol_s = statistics.median([wall - job for wall, job in zip(seconds["rest"], seconds["rest_server"])])
    date = time.strftime("%Y-%m-%d")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "profile": profile}
    report = {"date": date, "machine": machine, "size": args.size, "steps": args.steps, "runs": args.runs,
              "direct_median_s": round(direct_s, 4), "rest_median_s": round(rest_s, 4),
              "rest_overhead_s": round(rest_s - direct_s, 4), "protocol_overhead_s": round(protocol_s, 4),
              "runs_s": {key: [round(v, 4) for v in values] for key, values in seconds.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"rest-{date}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = "\n".join([
        f"### REST API overhead over a direct service call, demo model, {args.size}x{args.size}, {args.steps} steps "
        f"({date})", "",
        f"{machine['cpu']}, {machine['cores']} cores, {profile}; median of {args.runs} interleaved runs, wall time.",
        "", "| way | median s |", "| --- | --- |",
        f"| direct `GenerationService.generate` | {direct_s:.3f} |",
        f"| `POST /v1/images/generations` (openai client, b64_json) | {rest_s:.3f} |",
        f"| REST minus direct | {rest_s - direct_s:+.3f} |",
        f"| protocol alone (REST wall minus the job's time in the server) | {protocol_s:+.3f} |", "",
        "The server is another process: its generate time can differ from this process's (the two share the "
        "cores); the last row isolates what HTTP, JSON and base64 add to one job."])
    print(table)
    if not args.quick:
        write_section(ROOT / "benchmarks" / "RESULTS.md", f"rest-{machine['cpu']}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

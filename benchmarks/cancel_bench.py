#!/usr/bin/env python3
"""How fast the service lets go: cancel and stop latencies on the demo model (any machine, no GPU needed).

Against the real app (``python app.py --demo``) on a loopback port, for a 1024x1024 job of ``--steps``
steps, each measured ``--runs`` times:

* ``job.cancel()`` from ``gradio_client`` to ``/healthz`` saying the pipeline is free (``busy`` false);
* a client process killed (SIGKILL) mid-job to the pipeline free;
* the page's Cancel button in headless Chromium (Debian's ``chromium``, skipped when absent) to free;
* SIGTERM during a long job (``--shutdown-timeout-s 1``) to the process gone;

next to the time of one denoising step measured in the same run (the bound a cancel promises). Prints a
table and writes ``<out>/cancel-<date>.json`` and a section of ``benchmarks/RESULTS.md``.

    python benchmarks/cancel_bench.py               # results in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servers import start_server  # noqa: E402

VANISHING_CLIENT = """
import sys, time
from gradio_client import Client
job = Client(sys.argv[1], verbose=False, download_files=sys.argv[2]).submit(
    "a job", 1024, 1024, int(sys.argv[3]), 1, 1, api_name="/generate")
while not (job.status().progress_data and "Denoising step 2" in (job.status().progress_data[0].desc or "")):
    time.sleep(0.01)
print("denoising", flush=True)
time.sleep(600)
"""


def wait_free(server) -> float:
    started = time.monotonic()
    while server.health()[1]["busy"]:
        time.sleep(0.005)
    return time.monotonic() - started


def wait_denoising(job, step: int = 2) -> None:
    while True:
        status = job.status()
        if status.progress_data and f"Denoising step {step}/" in (status.progress_data[0].desc or ""):
            return
        time.sleep(0.005)


def step_seconds(server, tmp: Path) -> float:
    """Seconds per denoising step at 1024x1024: runs of 2 and 32 steps, so encode, decode and transfer cancel out."""
    from gradio_client import Client

    client = Client(server.url, verbose=False, download_files=str(tmp))
    times = {}
    for count in (2, 32, 2, 32):
        started = time.monotonic()
        client.predict("timing", 1024, 1024, count, 1, 1, api_name="/generate")
        times[count] = min(times.get(count, float("inf")), time.monotonic() - started)
    return max(0.0, (times[32] - times[2]) / 30)


def measure(args: argparse.Namespace, tmp: Path, data_dir: Path) -> dict:
    from gradio_client import Client

    (tmp / "app").mkdir(parents=True, exist_ok=True)
    server = start_server(tmp / "app", data_dir)
    results: dict[str, list[float]] = {"job.cancel()": [], "client killed": [], "page Cancel": []}
    try:
        step_s = step_seconds(server, tmp)
        client = Client(server.url, verbose=False, download_files=str(tmp))
        for _ in range(args.runs):
            job = client.submit("cancel me", 1024, 1024, args.steps, 2, 1, api_name="/generate")
            wait_denoising(job)
            started = time.monotonic()
            job.cancel()
            wait_free(server)
            results["job.cancel()"].append(time.monotonic() - started)
        for _ in range(args.runs):
            proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, server.url, str(tmp), str(args.steps)],
                                    stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()
            started = time.monotonic()
            proc.kill()
            proc.wait()
            wait_free(server)
            results["client killed"].append(time.monotonic() - started)
        results["page Cancel"] = page_cancel(server, args)
    finally:
        server.stop()
    results["SIGTERM to exit"] = sigterm_exits(tmp, data_dir, args)
    return {"step_s": step_s, "seconds": results}


def page_cancel(server, args: argparse.Namespace) -> list[float]:
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        return []
    from playwright.sync_api import sync_playwright

    seconds = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url, wait_until="domcontentloaded")
        page.locator("#prompt textarea").wait_for(timeout=60_000)
        page.locator("#prompt textarea").fill("cancel me")
        page.get_by_label("Steps").first.fill(str(args.steps))
        page.get_by_label("Steps").first.press("Tab")
        for _ in range(args.runs):
            page.get_by_role("button", name="Generate", exact=True).click()
            page.wait_for_function("() => document.querySelector('#result').innerText.includes('Denoising step 2/')",
                                   timeout=120_000)
            started = time.monotonic()
            page.get_by_role("button", name="Cancel", exact=True).click()
            wait_free(server)
            seconds.append(time.monotonic() - started)
            page.wait_for_function("() => document.querySelector('#cancel').disabled", timeout=30_000)
        browser.close()
    return seconds


def sigterm_exits(tmp: Path, data_dir: Path, args: argparse.Namespace) -> list[float]:
    from gradio_client import Client

    seconds = []
    for run in range(args.runs):
        (tmp / f"term{run}").mkdir(parents=True, exist_ok=True)
        server = start_server(tmp / f"term{run}", data_dir, "--shutdown-timeout-s", "1")
        job = Client(server.url, verbose=False, download_files=str(tmp)).submit(
            "a long job", 1024, 1024, 50, 1, 1, api_name="/generate")
        wait_denoising(job)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(120)
        seconds.append(time.monotonic() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="Measurements per kind.")
    parser.add_argument("--steps", type=int, default=8, help="Steps of the cancelled 1024x1024 jobs.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args(argv)
    from zimage.hardware import probe_devices
    from zimage.planner import choose_dtype

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        data_dir = tmp / "data"
        measured = measure(args, tmp, data_dir)
    from results_md import cpu_name

    machine = {"cpu": cpu_name(), "cores": __import__("os").cpu_count(),
               "dtype": choose_dtype("auto", "cpu", probe_devices()), "python": platform.python_version()}
    date = time.strftime("%Y-%m-%d")
    report = {"date": date, "machine": machine, "steps": args.steps, "runs": args.runs, **measured}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cancel-{date}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"### Cancel and stop latency, demo model, 1024x1024 ({date})", "",
             f"{machine['cpu']}, {machine['cores']} cores, {machine['dtype']}; one denoising step took "
             f"{measured['step_s']:.2f} s in this run.", "",
             "| from | to | median s | max s | runs |", "| --- | --- | --- | --- | --- |"]
    for kind, values in measured["seconds"].items():
        target = "process gone" if kind.startswith("SIGTERM") else "pipeline free"
        if values:
            lines.append(f"| {kind} | {target} | {statistics.median(values):.2f} | {max(values):.2f} | {len(values)} |")
        else:
            lines.append(f"| {kind} | {target} | not measured (no chromium) | | 0 |")
    table = "\n".join(lines)
    print(table)
    from results_md import write_section

    write_section(ROOT / "benchmarks" / "RESULTS.md", f"cancel-{machine['cpu']}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The real app on a loopback port, driven by gradio_client: API, queue bound, disconnects, health, metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from servers import ROOT, get, start_server
from zimage.storage import read_metadata

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("server"), data_dir, "--queue-size", "4")
    yield srv
    assert srv.stop() == 0, srv.log()


def client(server, tmp_path: Path):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(tmp_path))


def image_path(result) -> str:
    gallery, info = result
    first = gallery[0]["image"]
    return first if isinstance(first, str) else first["path"]


def test_generate_over_http_returns_the_png_with_its_seed(server, tmp_path: Path) -> None:
    c = client(server, tmp_path)
    # Long enough (24 steps at 1024x768) that polling the client's status sees the steps even on a fast CPU.
    job = c.submit("一只猫 a cat", 1024, 768, 24, 7, 1, api_name="/generate")
    progress = []
    while not job.done():
        status = job.status()
        if status.progress_data:
            unit = status.progress_data[0]
            progress.append((unit.desc, unit.progress))
        time.sleep(0.005)
    result = job.result()
    path = image_path(result)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1024, 768)
    meta = read_metadata(Path(path))
    assert meta["seed"] == 7 and meta["prompt"] == "一只猫 a cat" and meta["steps"] == 24
    info = result[1]
    # bf16 or fp32 on a CPU, whichever it computes natively (zimage.planner.choose_dtype).
    assert info["seed"] == 7 and info["profile"] in ("cpu (bf16)", "cpu (fp32)") and info["warnings"] == []
    assert (server.outputs / info["files"][0]).is_file()  # served from the outputs folder
    # Stages and steps reached the client, in order, and the bar never claimed 100% before the end.
    steps = [int(desc.split()[-1].split("/")[0]) for desc, _ in progress if desc.startswith("Denoising step")]
    assert steps and steps == sorted(steps) and all(d.endswith("/24") for d, _ in progress if "Denoising" in d)
    order = ["Queued", "Encoding", "Denoising", "Decoding", "Saving"]
    stages = [next(i for i, name in enumerate(order) if desc.startswith(name)) for desc, _ in progress]
    assert stages == sorted(stages) and all(fraction < 1 for _, fraction in progress), progress


def test_same_seed_twice_gives_identical_pixels(server, tmp_path: Path) -> None:
    c = client(server, tmp_path)
    first = c.predict("a red bicycle", 256, 256, 4, 1234, 1, api_name="/generate")
    second = c.predict("a red bicycle", 256, 256, 4, 1234, 1, api_name="/generate")
    other = c.predict("a red bicycle", 256, 256, 4, 1235, 1, api_name="/generate")
    load = lambda r: np.asarray(Image.open(image_path(r)).convert("RGB"))  # noqa: E731
    assert np.array_equal(load(first), load(second))
    assert not np.array_equal(load(first), load(other))


def test_random_seed_is_drawn_and_returned(server, tmp_path: Path) -> None:
    gallery, info = client(server, tmp_path).predict("a cat", 256, 256, 2, -1, 2, api_name="/generate")
    assert len(gallery) == 2 and 0 <= info["seed"] < 2**32 and info["seeds"] == [info["seed"], info["seed"] + 1]


def test_invalid_request_is_a_readable_error(server, tmp_path: Path) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client(server, tmp_path).predict("a cat", 1000, 256, 8, 1, 1, api_name="/generate")
    assert "width=1000 is not a multiple of 16: use 992 or 1008" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_healthz_and_metrics_move_after_requests(server, tmp_path: Path) -> None:
    status, health = server.health()
    assert status == 200
    assert health == {"status": "ready", "model": "demo (random weights)", "device": "cpu",
                      "profile": health["profile"], "queue_depth": 0, "busy": False}
    assert health["profile"] in ("cpu (bf16)", "cpu (fp32)")
    ok_before = server.metric('zimage_requests_total{outcome="ok"}')
    count_before = server.metric("zimage_generation_seconds_count")
    images_before = server.metric("zimage_images_generated_total")
    client(server, tmp_path).predict("a cat", 256, 256, 2, 5, 2, api_name="/generate")
    assert server.metric('zimage_requests_total{outcome="ok"}') == ok_before + 1
    assert server.metric("zimage_generation_seconds_count") == count_before + 1
    assert server.metric("zimage_images_generated_total") == images_before + 2
    _, text = get(server.url + "metrics")
    for name in ("zimage_queue_depth", "zimage_oom_recoveries_total", "zimage_model_ready 1.0",
                 'zimage_requests_total{outcome="busy"}'):
        assert name in text
    assert "zimage_gpu_peak_memory_bytes" in text  # declared; only set when there is a GPU


def test_no_file_outside_the_served_folders(server) -> None:
    status, body = get(server.url + "gradio_api/file=/etc/passwd")
    assert status in (403, 404) and "root:" not in body
    status, body = get(server.url + f"gradio_api/file={ROOT / 'app.py'}")
    assert status in (403, 404) and "GracefulServer" not in body


def test_one_structured_log_line_per_job_without_the_prompt(server, tmp_path: Path) -> None:
    import json

    client(server, tmp_path).predict("a very secret prompt", 256, 256, 2, 77, 1, api_name="/generate")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith('{"event": "generation"')]
    record = next(r for r in lines if r["seed"] == 77)
    assert record["outcome"] == "ok" and record["width"] == 256 and record["duration_s"] > 0
    assert "secret" not in server.log()


# --- Queue bound and disconnects (servers of their own) -----------------------------------------

def test_full_queue_refuses_with_a_busy_message_and_serves_the_rest(data_dir: Path, tmp_path: Path) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    srv = start_server(tmp_path, data_dir, "--queue-size", "1")
    try:
        outcomes: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            c = Client(srv.url, verbose=False, download_files=str(tmp_path / f"c{i}"))
            try:
                result = c.predict("a cat", 512, 512, 30, i, 1, api_name="/generate")
                outcome = "ok" if Path(image_path(result)).is_file() else "no image"
            except (QueueError, AppError) as exc:  # the service's bound answers with Gradio's words
                outcome = "busy" if "Queue is full" in str(exc) else f"error {exc}"
            except Exception as exc:  # noqa: BLE001
                outcome = f"error {type(exc).__name__}: {exc}"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert sorted(set(outcomes)) == ["busy", "ok"], outcomes
        served, refused = outcomes.count("ok"), outcomes.count("busy")
        assert served >= 2 and refused >= 1 and served + refused == 6
        assert srv.metric('zimage_requests_total{outcome="busy"}') == refused
        assert srv.metric('zimage_requests_total{outcome="ok"}') == served
        status, health = srv.health()
        assert status == 200 and health["queue_depth"] == 0 and not health["busy"]
    finally:
        assert srv.stop() == 0


CLIENT_THAT_VANISHES = """
import sys
from gradio_client import Client
c = Client(sys.argv[1], verbose=False, download_files=sys.argv[2])
job = c.submit("a long job", 1024, 1024, 50, 1, 1, api_name="/generate")
import time
while not (job.status().progress_data):
    time.sleep(0.05)
print("started", flush=True)
time.sleep(60)
"""


def job_records(server) -> list[dict]:
    import json

    return [json.loads(line) for line in server.log().splitlines() if line.startswith('{"event": "generation"')]


def wait_not_busy(server, timeout: float = 120) -> float:
    """Seconds until /healthz says no job holds the pipeline."""
    started = time.monotonic()
    while server.health()[1]["busy"]:
        assert time.monotonic() - started < timeout, "the pipeline stayed busy"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_killed_client_frees_the_gpu_every_time(data_dir: Path, tmp_path: Path, capsys) -> None:
    from gradio_client import Client

    srv = start_server(tmp_path, data_dir)
    try:
        freed = []
        for run in range(5):
            vanishing = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_VANISHES, srv.url, str(tmp_path)],
                                         stdout=subprocess.PIPE, text=True)
            assert vanishing.stdout.readline().strip() == "started"
            vanishing.kill()  # the connection drops mid-job, no goodbye
            vanishing.wait()
            killed = time.monotonic()
            wait_not_busy(srv)
            freed.append(time.monotonic() - killed)
            records = [r for r in job_records(srv) if r["outcome"] != "ok"]
            assert len(records) == run + 1, records
            last = records[-1]
            # Stopped mid-denoise (50 steps), never decoded, and logged as cancelled: run after run.
            assert last["outcome"] == "cancelled" and last["reason"] == "the client went away"
            assert last["stage"] == "denoising" and last["step"] < 50, last
        with capsys.disabled():
            print(f"\n[server] killed client -> pipeline free after {', '.join(f'{s:.2f}' for s in freed)} s")
        result = Client(srv.url, verbose=False, download_files=str(tmp_path)).predict(
            "the next job", 256, 256, 2, 3, 1, api_name="/generate")
        assert Path(image_path(result)).is_file() and srv.health()[0] == 200
    finally:
        assert srv.stop() == 0


def wait_denoising(job) -> None:
    while True:
        status = job.status()
        if status.progress_data and (status.progress_data[0].desc or "").startswith("Denoising step"):
            return
        time.sleep(0.02)


def test_job_cancel_from_gradio_client_stops_within_a_step_without_decoding(server, tmp_path: Path, capsys) -> None:
    c = client(server, tmp_path)
    job = c.submit("cancel me", 1024, 1024, 50, 21, 1, api_name="/generate")
    wait_denoising(job)
    cancelled = time.monotonic()
    job.cancel()
    freed = wait_not_busy(server)
    with capsys.disabled():
        print(f"\n[server] gradio_client job.cancel() -> pipeline free after {time.monotonic() - cancelled:.2f} s")
    record = next(r for r in job_records(server) if r["seed"] == 21)
    assert record["outcome"] == "cancelled" and record["stage"] == "denoising" and record["step"] < 50
    assert freed < 120


def test_cancelling_one_of_two_jobs_of_a_client_leaves_the_other(server, tmp_path: Path) -> None:
    c = client(server, tmp_path)  # one client: one Gradio session for both jobs
    first = c.submit("first", 512, 512, 12, 31, 1, api_name="/generate")
    second = c.submit("second", 512, 512, 12, 32, 1, api_name="/generate")
    while not (first.status().progress_data and second.status().progress_data):  # both are service jobs now
        time.sleep(0.02)
    second.cancel()
    gallery, info = first.result(timeout=240)
    assert info["seed"] == 31 and Path(image_path((gallery, info))).is_file()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        outcomes = {r["seed"]: r["outcome"] for r in job_records(server) if r["seed"] in (31, 32)}
        if len(outcomes) == 2:
            break
        time.sleep(0.1)
    assert outcomes == {31: "ok", 32: "cancelled"}, server.log()[-3000:]


@pytest.mark.parametrize(("args", "message"), [
    (("a cat", 256.5, 256, 8, 1, 1), "width=256.5 must be a whole number of pixels"),
    (("a cat", 256, 256, True, 1, 1), "steps=True must be a whole number"),
    ((12345, 256, 256, 8, 1, 1), "prompt=12345 must be text"),
    (("a cat", 256, 256, 8, -5, 1), "seed=-5 is out of range"),  # only -1 means "random"
])
def test_wrong_types_are_refused_not_coerced(server, tmp_path: Path, args: tuple, message: str) -> None:
    from gradio_client.exceptions import AppError

    invalid_before = server.metric('zimage_requests_total{outcome="invalid"}')
    with pytest.raises(AppError) as info:
        client(server, tmp_path).predict(*args, api_name="/generate")
    assert message in str(info.value) and "Traceback" not in server.log()
    assert server.metric('zimage_requests_total{outcome="invalid"}') == invalid_before + 1


def generate_fn_index(server) -> int:
    import json

    _, body = get(server.url + "config")
    return next(d["id"] for d in json.loads(body)["dependencies"] if d.get("api_name") == "generate")


def post_json(url: str, value: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_nobody_cancels_a_job_of_another_session(server) -> None:
    fn_index = generate_fn_index(server)
    status, joined = post_json(server.url + "gradio_api/queue/join", {
        "data": ["alice's job", 512, 512, 12, 41, 1, 0.0, "", []], "fn_index": fn_index, "session_hash": "alice-session"})
    assert status == 200
    status, answer = post_json(server.url + "gradio_api/cancel", {
        "event_id": joined["event_id"], "session_hash": "mallory-session", "fn_index": fn_index})
    assert status == 200 and answer == {"success": False}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(r["seed"] == 41 for r in job_records(server)):
        time.sleep(0.1)
    (record,) = [r for r in job_records(server) if r["seed"] == 41]
    assert record["outcome"] == "ok"


def test_a_call_with_the_wrong_number_of_values_is_one_clear_refusal(server) -> None:
    invalid_before = server.metric('zimage_requests_total{outcome="invalid"}')
    for data in (["a cat", 256], ["a cat", 256, 256, 8, 1, 1, 0.0, "", [], "extra"]):
        status, answer = post_json(server.url + "gradio_api/call/generate", {"data": data})
        assert status == 422 and ("/generate takes 9 values (prompt, width, height, steps, seed, num_images, "
                                  f"guidance_scale, negative_prompt, loras); {len(data)} were sent") in answer["error"]
    status, answer = post_json(server.url + "gradio_api/queue/join", {
        "data": ["a cat"], "fn_index": generate_fn_index(server), "session_hash": "s"})
    assert status == 422 and "/generate takes 9 values" in answer["error"] and "1 were sent" in answer["error"]
    assert server.metric('zimage_requests_total{outcome="invalid"}') == invalid_before + 3
    assert "Traceback" not in server.log()


def test_healthz_answers_head_for_load_balancers(server) -> None:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(server.url + "healthz", method="HEAD"), timeout=5) as answer:
        assert answer.status == 200


def test_healthz_reports_an_outputs_folder_that_cannot_take_images(data_dir: Path, tmp_path: Path) -> None:
    import shutil

    srv = start_server(tmp_path, data_dir)
    try:
        shutil.rmtree(srv.outputs, ignore_errors=True)
        srv.outputs.write_text("not a folder")  # where the images should go, a file now
        deadline = time.monotonic() + 30
        while srv.health()[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        status, health = srv.health()
        assert status == 503 and health["status"] == "unhealthy" and str(srv.outputs) in health["error"]
        srv.outputs.unlink()
        deadline = time.monotonic() + 30
        while srv.health()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.health()[0] == 200
    finally:
        assert srv.stop() == 0


def test_healthz_is_503_while_loading(tmp_path: Path) -> None:
    # A fresh data folder: the demo model is built first, so the server is up before the model.
    srv = start_server(tmp_path, tmp_path / "fresh-data")
    try:
        assert (503, "loading") in srv.health_seen, srv.health_seen
        assert srv.health_seen[-1] == (200, "ready")
    finally:
        assert srv.stop() == 0


def test_missing_model_exits_with_one_clear_line(tmp_path: Path, data_dir: Path) -> None:
    done = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "nope"), "--port", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"ZIMAGE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode in (1, 2)
    out = done.stdout + done.stderr
    assert "Traceback" not in out


def test_sigterm_cancels_a_job_that_outlasts_the_shutdown_bound(data_dir: Path, tmp_path: Path) -> None:
    from gradio_client import Client

    srv = start_server(tmp_path, data_dir, "--shutdown-timeout-s", "1")
    try:
        job = Client(srv.url, verbose=False, download_files=str(tmp_path)).submit(
            "a job far longer than the bound", 1536, 1536, 50, 1, 1, api_name="/generate")
        while not job.status().progress_data:
            time.sleep(0.05)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        # 50 steps at 1536x1536 take ~35 s here: the job was cancelled after the 1 s bound, not waited for
        # (what remains is the 2 s result grace and uvicorn closing the client's open stream).
        assert time.monotonic() - signalled < 20
        log = srv.log()
        assert "outlasted the 1 s shutdown bound" in log and '"outcome": "cancelled"' in log
    finally:
        srv.stop()


def test_image_to_image_and_inpainting_over_the_api(server, tmp_path: Path) -> None:
    import hashlib

    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (300, 200), (220, 30, 30)).save(source)
    painted = Image.new("L", (300, 200), 0)
    painted.paste(255, (50, 50, 150, 150))
    painted.save(mask)
    c = client(server, tmp_path)
    gallery, info = c.predict("a cat", handle_file(str(source)), 0.5, 256, 256, 4, 3, 1, api_name="/img2img")
    assert info["mode"] == "img2img" and info["steps"] == 4
    assert "in.png is 300x200: it was resized to 256x256" in info["warnings"][0]  # said, not silent
    meta = read_metadata(Path(image_path((gallery, info))))
    assert meta["strength"] == 0.5 and meta["inputs"] == [
        {"name": "in.png", "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "role": "image"}]
    gallery, info = c.predict("a cat", handle_file(str(source)), handle_file(str(mask)), 1.0, 256, 256, 4, 3, 1,
                              api_name="/inpaint")
    assert info["mode"] == "inpaint"
    assert [(entry["name"], entry["role"]) for entry in read_metadata(Path(image_path((gallery, info))))["inputs"]] \
        == [("in.png", "image"), ("mask.png", "mask")]
    Image.new("L", (300, 200), 0).save(mask)  # nothing to repaint
    with pytest.raises(AppError, match="mask.png is all black"):
        c.predict("a cat", handle_file(str(source)), handle_file(str(mask)), 1.0, 256, 256, 4, 3, 1,
                  api_name="/inpaint")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="notes.png is not a PNG, JPEG or WebP image"):
        c.predict("a cat", handle_file(str(tmp_path / "notes.png")), 0.5, 256, 256, 4, 3, 1, api_name="/img2img")


def test_a_file_path_that_was_not_uploaded_is_never_read(server) -> None:
    """Gradio copies file records' paths into its cache before any handler runs, unchecked for a mounted app: a
    client naming a file of the server (or a URL to fetch) is refused before Gradio sees the call."""
    invalid_before = server.metric('zimage_requests_total{outcome="invalid"}')
    paths = ("/etc/hostname", str(server.outputs / ".." / "app.log"), "http://127.0.0.1:9/x.png")
    for path in paths:
        record = {"path": path, "meta": {"_type": "gradio.FileData"}}
        status, answer = post_json(server.url + "gradio_api/call/img2img", {"data": [
            "a cat", record, 0.5, 256, 256, 2, 1, 1, 0.0, "", []]})
        assert status == 422 and "was not uploaded to this server" in answer["error"], answer
        status, answer = post_json(server.url + "gradio_api/queue/join", {  # nested, as an editor sends it
            "data": ["a cat", {"background": record, "layers": [record]}], "fn_index": 0, "session_hash": "s"})
        assert status == 422 and "was not uploaded to this server" in answer["error"], answer
    assert server.metric('zimage_requests_total{outcome="invalid"}') == invalid_before + 2 * len(paths)
    assert not list(server.outputs.parent.joinpath("gradio-cache").rglob("hostname"))
    assert "Traceback" not in server.log()


def test_controlnet_loras_and_the_lora_list_over_the_api(data_dir: Path, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from zimage.lora import write_demo_lora

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    write_demo_lora(lora_dir / "style.safetensors", "comfyui", seed=3)
    (lora_dir / "old.ckpt").write_bytes(b"pickle")
    srv = start_server(tmp_path, data_dir, "--lora-dir", str(lora_dir))
    try:
        c = Client(srv.url, verbose=False, download_files=str(tmp_path))
        listing = {entry["name"]: entry for entry in c.predict(api_name="/loras")}
        assert listing["style"]["fits"] and listing["style"]["format"] == "comfyui"
        assert not listing["old"]["fits"] and listing["old"]["problem"]
        base = c.predict("a cat", 256, 256, 3, 5, 1, api_name="/generate")
        styled = c.predict("a cat", 256, 256, 3, 5, 1, loras=[{"name": "style", "weight": 1.5}], api_name="/generate")
        again = c.predict("a cat", 256, 256, 3, 5, 1, api_name="/generate")
        pixels = [np.asarray(Image.open(image_path(result))) for result in (base, styled, again)]
        assert not np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
        meta = read_metadata(Path(image_path(styled)))
        assert [(entry["name"], entry["weight"]) for entry in meta["loras"]] == [("style", 1.5)]
        assert styled[1]["loras"][0]["sha256"] == meta["loras"][0]["sha256"]
        for bad, message in (([{"name": "old"}], "old"), ([{"name": "style", "weight": 3}], "weight"),
                             ("style", "send a list, e.g."), ([{"nom": "style"}], r"loras\[0\]=")):
            with pytest.raises(AppError, match=message):
                c.predict("a cat", 256, 256, 3, 5, 1, loras=bad, api_name="/generate")
        control = tmp_path / "edges.png"
        Image.new("RGB", (256, 256), 0).save(control)
        gallery, info = c.predict("a cat", handle_file(str(control)), 0.75, 256, 256, 3, 5, 1, api_name="/controlnet")
        assert info["mode"] == "controlnet"
        mask = tmp_path / "mask.png"
        Image.new("L", (256, 256), 255).save(mask)
        gallery, info = c.predict("a cat", handle_file(str(control)), 0.75, 256, 256, 3, 5, 1,
                                  image=handle_file(str(control)), mask=handle_file(str(mask)), api_name="/controlnet")
        assert info["mode"] == "controlnet_inpaint"
        assert [entry["role"] for entry in read_metadata(Path(image_path((gallery, info))))["inputs"]] == [
            "image", "control_image", "mask"]
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_mode_endpoint_never_falls_back_to_another_mode(server) -> None:
    """A missing input is refused by name; a value that is not a file record never reaches Gradio's parser."""
    import urllib.request

    cases = [
        ("img2img", ["a cat", None, 0.6, 256, 256, 2, 1, 1, 0.0, "", []], "an input image is required"),
        ("inpaint", ["a cat", None, None, 1.0, 256, 256, 2, 1, 1, 0.0, "", []], "an input image is required"),
        ("controlnet", ["a cat", None, 0.75, 256, 256, 2, 1, 1, None, None, 0.0, "", []], "a control image is required"),
    ]
    for name, data, message in cases:
        status, answer = post_json(server.url + f"gradio_api/call/{name}", {"data": data})
        assert status == 200, answer
        with urllib.request.urlopen(f"{server.url}gradio_api/call/{name}/{answer['event_id']}", timeout=60) as stream:
            events = stream.read().decode()
        assert "event: error" in events and message in events, events
    for value in ("/etc/passwd", 5):
        status, answer = post_json(server.url + "gradio_api/call/img2img", {
            "data": ["a cat", value, 0.6, 256, 256, 2, 1, 1, 0.0, "", []]})
        assert status == 422 and "is not a file" in answer["error"], answer
    assert "Traceback" not in server.log()

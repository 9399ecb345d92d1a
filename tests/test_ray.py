"""Ray Serve scale-out (zimage/serve_ray.py).

Without Ray: the options and their mapping to Ray's deployment options, serve.yaml's args, the replica's app, health
and check_health in this process, the command's refusals, and that the single-machine app never imports Ray.

With Ray (marked ``ray``; skipped when Ray is not installed): ``python -m zimage serve-ray`` started once for the
module, a local Ray instance with two replicas of the demo model, driven over HTTP with the official ``openai``
client: both replicas serve, the same seed gives the same pixels on either, a URL answer is served by any replica
from the shared folder, a burst beyond the bound gets 429 with Retry-After while every accepted request completes, a
replica killed mid-run is replaced while the deployment keeps answering, and SIGTERM stops it all with no Ray process
left. Then a model that loads in no replica ends the command with status 1 and the replicas' message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zimage.serve_ray import (
    RayOptions,
    RayOptionsError,
    ZImageReplica,
    build_asgi_app,
    health_problem,
    options_from_mapping,
    settings_for_replicas,
)
from zimage.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray Serve is optional and not installed: pip install -r "
                                                   "requirements-ray.txt (scripts/install.sh --dev does)")
#: The bound of the module's server: 2 replicas x 2 ongoing requests + 8 queued in Ray's proxy. Ray counts a request
#: as queued until it is assigned to a replica, so a simultaneous burst of more than MAX_QUEUED may see refusals
#: even with free replicas (Ray's router says so): the other tests send at most 8 at once.
REPLICAS, MAX_ONGOING, MAX_QUEUED, RETRY_AFTER_S = 2, 2, 8, 3


# --- Without Ray ---------------------------------------------------------------------------------------------------

def test_the_single_machine_app_never_imports_ray() -> None:
    code = ("import sys, app, zimage.web, zimage.service, zimage.openai_api, zimage.cli, zimage.serve_ray; "
            "zimage.cli.build_parser(); print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("fields, message", [
    ({"replicas": 0}, "replicas=0 is out of range: use a whole number from 1 to 1000 (--replicas)"),
    ({"min_replicas": 1}, "autoscaling needs both --min-replicas and --max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas=3 is above max_replicas=2"),
    ({"replicas": 2, "min_replicas": 1, "max_replicas": 4}, "replicas=2 is a fixed count, and --min-replicas"),
    ({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests=0 is out of range"),
    ({"max_ongoing_requests": 0}, "(--max-ongoing-requests)"),
    ({"max_queued_requests": 0}, "max_queued_requests=0 is out of range"),
    ({"backpressure_status": 500}, "use 429 or 503"),
    ({"retry_after_s": 1.5}, "retry_after_s=1.5 is out of range"),
    ({"replica_cpus": 0}, "replica_cpus=0 is out of range: use more than 0"),
    ({"replica_gpus": True}, "replica_gpus=True is out of range"),
])
def test_bad_ray_options_are_refused_naming_the_value_and_flag(fields: dict, message: str) -> None:
    with pytest.raises(RayOptionsError) as caught:
        RayOptions(**fields).validate()
    assert message in str(caught.value)


def test_options_map_to_rays_deployment_options() -> None:
    settings = Settings(shutdown_timeout_s=12)
    fixed = RayOptions(replicas=3, max_ongoing_requests=2, max_queued_requests=5, retry_after_s=7).validate()
    options = fixed.deployment_options(settings)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0}  # no GPU in the cluster: none asked for
    assert options["max_ongoing_requests"] == 2 and options["max_queued_requests"] == 5
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 7}
    assert options["graceful_shutdown_timeout_s"] == 12
    assert fixed.deployment_options(settings, gpus_in_cluster=4)["ray_actor_options"] == {"num_cpus": 1.0,
                                                                                          "num_gpus": 1.0}
    assert RayOptions(replica_gpus=0.5).deployment_options(settings, gpus_in_cluster=4)["ray_actor_options"][
        "num_gpus"] == 0.5
    auto = RayOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=1.5).validate()
    options = auto.deployment_options(settings)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1.5}
    assert "1-4 replicas (autoscaled" in auto.describe()


def test_serve_yaml_args_become_settings_and_options(tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text(encoding="utf-8"))
    (application,) = config["applications"]
    assert application["import_path"] == "zimage.serve_ray:app_builder"
    settings, options = options_from_mapping(application["args"], environ={})
    assert settings.demo is True and options == RayOptions(**{k: v for k, v in application["args"].items()
                                                              if k in RayOptions.__dataclass_fields__})
    settings, options = options_from_mapping({"model": "/models/Z", "memory_options": ["vae-tiling"], "port": 8000,
                                              "replicas": 4, "replica_gpus": 1, "outputs_dir": "out"},
                                             environ={"ZIMAGE_QUEUE_SIZE": "3"})
    assert (settings.model, settings.memory_options, settings.port, settings.queue_size) == (
        "/models/Z", ("vae-tiling",), 8000, 3)
    assert options.replicas == 4 and options.replica_gpus == 1
    assert settings_for_replicas(settings).outputs_dir == Path("out").absolute()
    with pytest.raises(SettingsError, match="unknown key.*replica_count"):
        options_from_mapping({"replica_count": 2})
    with pytest.raises(SettingsError, match="queue_size=0 is out of range"):
        options_from_mapping({"queue_size": 0})


@needs_ray
def test_app_builder_builds_the_application_of_serve_yaml_and_refuses_an_open_rest_api() -> None:
    import yaml

    from zimage.serve_ray import app_builder

    config = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text(encoding="utf-8"))
    assert type(app_builder(config["applications"][0]["args"])).__name__ == "Application"
    with pytest.raises(SettingsError, match="without --api-key"):
        app_builder({"demo": True, "host": "0.0.0.0"})
    with pytest.raises(SettingsError, match="each replica sees only the GPU Ray gives it"):
        app_builder({"demo": True, "device": "cuda:1"})


@pytest.mark.parametrize("state, error, replaced", [("ready", None, False), ("stopping", None, False),
                                                     ("failed", "CUDA error: an illegal memory access", True),
                                                     ("starting", None, True)])
def test_health_maps_the_service_state(state: str, error: str | None, replaced: bool) -> None:
    problem = health_problem(state, error)
    assert (problem is not None) == replaced
    if error:
        assert error in problem


def test_the_replica_serves_the_rest_api_and_its_health_in_process(data_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    settings = Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path / "outputs")
    replica = ZImageReplica(settings, b"k" * 32, replica_id="r1")
    try:
        client = TestClient(replica.__serve_build_asgi_app__())
        answer = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256", "steps": 2,
                                                              "seed": 3, "response_format": "url"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-zimage-replica"] == "r1" and answer.json()["replica"] == "r1"
        link = answer.json()["data"][0]["url"]
        # Another replica with the same key serves the link (Ray passes one key to all of them).
        other = TestClient(build_asgi_app(replica.service, settings, "r2", b"k" * 32))
        fetched = other.get(link.split("testserver", 1)[1])
        assert fetched.status_code == 200 and fetched.headers["x-zimage-replica"] == "r2"
        assert fetched.content == (settings.outputs_dir / link.split("/v1/files/")[1].split("?")[0]).read_bytes()
        assert TestClient(build_asgi_app(replica.service, settings, "r3", b"x" * 32)).get(
            link.split("testserver", 1)[1]).status_code == 404  # a key of another deployment: not signed here
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ready" and health.json()["replica"] == "r1"
        replica.check_health()
        replica.service.state, replica.service.load_error = "failed", "the GPU is gone"
        with pytest.raises(RuntimeError, match="replica r1: the generation service failed: the GPU is gone"):
            replica.check_health()
        assert client.get("/healthz").status_code == 503
    finally:
        replica.service.state = "ready"
        replica.close()
        replica.close()  # idempotent


def test_serve_ray_refuses_bad_settings_before_starting_ray(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from zimage.cli import main

    assert main(["serve-ray", "--replicas", "0"]) == 2
    assert "replicas=0 is out of range" in capsys.readouterr().err
    assert main(["serve-ray", "--demo", "--host", "0.0.0.0"]) == 2
    assert "without --api-key" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve-ray", "--demo"]) == 2
    assert "pip install -r requirements-ray.txt" in capsys.readouterr().err


# --- With Ray: one serve-ray for the module ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray_server import start_ray_server

    server = start_ray_server(tmp_path_factory.mktemp("serve-ray"), data_dir, "--replicas", str(REPLICAS),
                              "--replica-cpus", "0.5", "--max-ongoing-requests", str(MAX_ONGOING),
                              "--max-queued-requests", str(MAX_QUEUED), "--retry-after-s", str(RETRY_AFTER_S),
                              "--shutdown-timeout-s", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(ray_server):
    from openai import OpenAI

    # No retries: the tests look at every answer (the SDK would retry 429/500/503 twice by itself).
    return OpenAI(base_url=ray_server.url + "v1", api_key="unused", max_retries=0, timeout=120)


def generate(client, size: str = "256x256", **fields) -> tuple[str, dict, np.ndarray | None]:
    """(replica of the header, JSON body, pixels of the first image) of one b64 generation (2 steps unless given).
    Raises the SDK's error for any answer but 200."""
    raw = client.images.with_raw_response.generate(prompt=fields.pop("prompt", "a lighthouse"), size=size,
                                                   extra_body={"steps": 2, **fields})
    body = raw.parse()
    pixels = None
    if body.data and body.data[0].b64_json:
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body.data[0].b64_json))))
    return raw.headers["x-zimage-replica"], body.model_dump(), pixels


def spread(client, count: int, **fields) -> list[tuple[str, dict, np.ndarray | None]]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: generate(client, **fields), range(count)))


@needs_ray
@pytest.mark.ray
def test_concurrent_requests_are_served_by_both_replicas(client) -> None:
    answers = spread(client, 2 * REPLICAS * MAX_ONGOING, steps=8)
    replicas = {header for header, _, _ in answers}
    assert len(replicas) == REPLICAS, answers
    assert all(body["replica"] == header for header, body, _ in answers)


@needs_ray
@pytest.mark.ray
def test_the_same_seed_gives_identical_pixels_on_either_replica(client) -> None:
    by_replica: dict[str, list[np.ndarray]] = {}
    for _ in range(5):  # Ray picks the replica; a few rounds of concurrent requests reach both
        for header, _, pixels in spread(client, REPLICAS * MAX_ONGOING, seed=1234):
            by_replica.setdefault(header, []).append(pixels)
        if len(by_replica) == REPLICAS:
            break
    assert len(by_replica) == REPLICAS
    first = next(iter(by_replica.values()))[0]
    assert all(np.array_equal(first, pixels) for images in by_replica.values() for pixels in images)


@needs_ray
@pytest.mark.ray
def test_a_url_answer_is_served_by_any_replica_from_the_shared_folder(client, ray_server) -> None:
    import httpx

    header, body, _ = generate(client, seed=5, response_format="url")
    url = body["data"][0]["url"]
    name = url.split("/v1/files/")[1].split("?")[0]
    on_disk = (ray_server.outputs / name).read_bytes()
    served_by = set()
    for _ in range(6):  # concurrent fetches spread over the replicas; any of them signs and serves alike
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            fetched = list(pool.map(lambda _: httpx.get(url, timeout=30), range(4)))
        assert all(answer.status_code == 200 and answer.content == on_disk for answer in fetched)
        served_by |= {answer.headers["x-zimage-replica"] for answer in fetched}
        if len(served_by) == REPLICAS:
            break
    assert len(served_by) == REPLICAS, served_by


@needs_ray
@pytest.mark.ray
def test_a_burst_beyond_the_bound_gets_429_with_retry_after_and_every_accepted_request_completes(ray_server) -> None:
    import httpx

    burst = 5 * (REPLICAS * MAX_ONGOING + MAX_QUEUED)  # the bound: what the replicas and Ray's proxy hold

    def post(_: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        answer = httpx.post(ray_server.url + "v1/images/generations", timeout=120,
                            json={"prompt": "a burst", "size": "256x256", "steps": 30, "seed": 9})
        return answer, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(post, range(burst)))
    statuses = [answer.status_code for answer, _ in answers]
    accepted = [answer for answer, _ in answers if answer.status_code == 200]
    refused = [(answer, seconds) for answer, seconds in answers if answer.status_code == 429]
    assert len(accepted) + len(refused) == burst and accepted and refused, statuses
    for answer, seconds in refused:  # refused at once by Ray's proxy, never after waiting
        assert answer.headers["retry-after"] == str(RETRY_AFTER_S) and seconds < 5
        assert "backpressure" in answer.text  # Ray's own plain-text body
    assert all(len(base64.b64decode(answer.json()["data"][0]["b64_json"])) > 1000 for answer in accepted)


@needs_ray
@pytest.mark.ray
def test_the_ray_benchmark_measures_a_running_deployment(ray_server) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ray_bench

    row = ray_bench.measure(ray_server.url, clients=2, images_per_client=2, size_px=256, steps=2)
    assert row["images"] == 4 and row["failures"] == 0 and row["images_per_min"] > 0
    assert sum(row["per_replica"].values()) == 4


@needs_ray
@pytest.mark.ray
def test_a_replica_killed_mid_run_is_replaced_and_the_deployment_keeps_answering(client, ray_server) -> None:
    import httpx

    before = {header for header, _, _ in spread(client, REPLICAS * MAX_ONGOING)}
    victims = ray_server.replica_processes()
    assert len(victims) == REPLICAS and len(before) == REPLICAS

    def long_request(_: int) -> int:  # 50 steps at 512x512: seconds on one thread, so the kill lands mid-run
        try:
            return httpx.post(ray_server.url + "v1/images/generations", timeout=120,
                              json={"prompt": "long", "size": "512x512", "steps": 50}).status_code
        except httpx.HTTPError:
            return -1

    with concurrent.futures.ThreadPoolExecutor(REPLICAS * MAX_ONGOING) as pool:
        running = [pool.submit(long_request, index) for index in range(REPLICAS * MAX_ONGOING)]
        time.sleep(1.5)
        victims[0].kill()  # SIGKILL, as the kernel's OOM killer would
        killed_at = time.monotonic()
        in_flight = [future.result() for future in running]
    # Requests on the killed replica end with Ray's 500; those on the other one complete.
    assert set(in_flight) <= {200, 500} and 200 in in_flight, in_flight
    for _ in range(4):  # right after the kill the deployment answers (generate raises on anything but 200)
        generate(client)
    new: set[str] = set()
    while time.monotonic() - killed_at < 120 and not new:
        new = {header for header, _, _ in spread(client, REPLICAS * MAX_ONGOING)} - before
        time.sleep(0.5)
    assert new, f"no new replica within 120 s of the kill:\n{ray_server.log()[-4000:]}"
    seen: set[str] = set()
    for _ in range(3):
        seen |= {header for header, _, _ in spread(client, REPLICAS * MAX_ONGOING)}
    assert len(seen) == REPLICAS and len(seen & before) == 1, (before, seen)  # the killed one never again
    assert len(ray_server.replica_processes()) == REPLICAS


@needs_ray
@pytest.mark.ray
def test_sigterm_lets_running_requests_finish_and_leaves_no_ray_process(client, ray_server) -> None:
    assert ray_server.processes()  # Ray's processes, remembered for the check below
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(generate, client, "512x512", steps=50) for _ in range(2)]
        time.sleep(0.5)
        stopped_at = time.monotonic()
        status = ray_server.stop()
        answers = [future.result() for future in running]
    assert status == 0, ray_server.log()[-4000:]
    assert time.monotonic() - stopped_at < 20 + 30  # --shutdown-timeout-s 20, plus Ray's own stop
    assert all(pixels is not None for _, _, pixels in answers)
    deadline = time.monotonic() + 10
    while ray_server.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_server.leftovers() == [], ray_server.log()[-4000:]


@needs_ray
@pytest.mark.ray
def test_a_model_that_does_not_load_in_the_replicas_ends_the_command_with_its_message(data_dir: Path,
                                                                                      tmp_path: Path) -> None:
    from servers import free_port

    broken = tmp_path / "broken-model"  # found by the start-up check, refused by diffusers in each replica
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "zimage", "serve-ray", "--model", str(broken), "--replica-cpus",
                           "0.5", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "ZIMAGE_DATA_DIR": str(data_dir),
                               "ZIMAGE_OUTPUTS_DIR": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the deployment failed: Model '{broken}' could not be loaded")

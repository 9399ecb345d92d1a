"""The OpenAI-compatible REST API, driven by the official ``openai`` package against the real app on loopback."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from servers import get, start_server
from zimage.openai_api import URL_TTL_S, UrlSigner, parse_size, rest_api_problem
from zimage.settings import Settings

pytestmark = pytest.mark.server
openai = pytest.importorskip("openai", reason="the openai package is a dev dependency: scripts/install.sh --dev")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("rest"), data_dir, "--api-key", KEY, "--queue-size", "2")
    yield srv
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()
    assert KEY not in srv.log()  # the key is never logged


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)


def metadata(answer) -> dict:
    """The parameters saved in the first returned PNG."""
    from zimage.storage import METADATA_KEY

    return json.loads(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).text[METADATA_KEY])


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_generate_b64_with_seed_gives_identical_pixels_and_the_openai_shape(client) -> None:
    first = client.images.generate(prompt="一只猫 a cat", size="256x256", n=2, response_format="b64_json",
                                   model="z-image-turbo", extra_body={"seed": 42, "steps": 2})
    single = [client.images.generate(prompt="一只猫 a cat", size="256x256", response_format="b64_json",
                                     extra_body={"seed": 43, "steps": 2}) for _ in range(2)]
    assert isinstance(first.created, int) and len(first.data) == 2
    assert pixels(first.data[0].b64_json).shape == (256, 256, 3)
    assert np.array_equal(pixels(single[0].data[0].b64_json), pixels(single[1].data[0].b64_json))  # same seed
    # Image i of a request uses seed + i: the second image is the single image of seed 43 (batched bf16
    # arithmetic may move a few pixels by a few levels).
    difference = np.abs(pixels(first.data[1].b64_json).astype(int) - pixels(single[0].data[0].b64_json))
    assert difference.max() <= 8 and difference.mean() < 0.5
    body = first.to_dict()
    assert body["model"] == "z-image-turbo" and body["size"] == "256x256" and body["output_format"] == "png"
    assert [item["seed"] for item in body["data"]] == [42, 43] and body["data"][0]["timings"]["generate_s"] > 0


def test_url_response_is_a_signed_link_that_expires(client, server) -> None:
    answer = client.images.generate(prompt="a red bicycle", size="256x256", response_format="url",
                                    extra_body={"seed": 7, "steps": 2})
    url = answer.data[0].url
    assert url.startswith(server.url + "v1/files/") and "signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:  # no key needed: the link is the credential
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.read())).size == (256, 256)
    tampered = url.replace("signature=", "signature=0")
    assert get(tampered)[0] == 404
    name = url.split("/v1/files/")[1].split("?")[0]
    expired = UrlSigner(KEY).sign(name, now=time.time() - URL_TTL_S - 5)
    assert get(f"{server.url}v1/files/{name}?{expired}")[0] == 404
    assert get(f"{server.url}v1/files/..%2F..%2Fetc%2Fpasswd?{UrlSigner(KEY).sign('../../etc/passwd')}")[0] == 404


def test_bad_values_are_bad_request_errors_naming_the_value(client, server) -> None:
    invalid_before = server.metric('zimage_requests_total{outcome="invalid"}')
    # error.param names the request field at fault in this API's terms (the service says width, OpenAI size).
    cases = [
        ({"size": "1000x1000"}, "not a multiple of 16", "size"),
        ({"size": "big"}, "WIDTHxHEIGHT", "size"),
        ({"n": 9}, "n=9", "n"),
        ({"response_format": "jpeg"}, "response_format", "response_format"),
        ({"extra_body": {"steps": "8"}}, "steps='8'", "steps"),
        ({"extra_body": {"steps": 8, "guidance_scale": 99}}, "guidance_scale=99", "guidance_scale"),
        ({"extra_body": {"seed": -5}}, "seed=-5", "seed"),
        ({"extra_body": {"loras": [{"name": "missing"}]}}, "missing", "loras"),
        ({"extra_body": {"loras": {"name": "style"}}}, "send a list, e.g.", "loras"),
        ({"extra_body": {"loras": [["style", 10**400]]}}, "is out of range", "loras"),  # no float overflow
        ({"extra_body": {"colour": "red"}}, "'colour'", "colour"),
    ]
    for overrides, message, param in cases:
        kwargs = {"prompt": "a cat", "size": "256x256", **overrides}
        with pytest.raises(openai.BadRequestError, match=message) as caught:
            client.images.generate(**kwargs)
        assert caught.value.status_code == 400 and caught.value.body["type"] == "invalid_request_error"
        assert caught.value.body["param"] == param, (overrides, caught.value.body)
    assert server.metric('zimage_requests_total{outcome="invalid"}') == invalid_before + len(cases)


def test_a_wrong_or_missing_key_is_an_authentication_error(server) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            bad.images.generate(prompt="a cat", size="256x256")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0).models.list()


def test_models_lists_the_loaded_model(client) -> None:
    assert [model.id for model in client.models.list()] == ["demo"]


def test_edits_inpaint_with_an_openai_mask_and_image_to_image_without(client, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (30, 90, 200)).save(source)
    mask = tmp_path / "mask.png"
    transparent_hole = Image.new("RGBA", (300, 200), (0, 0, 0, 255))
    transparent_hole.paste((0, 0, 0, 0), (100, 50, 200, 150))  # OpenAI's rule: transparent is edited
    transparent_hole.save(mask)
    with open(source, "rb") as image, open(mask, "rb") as mask_file:
        edited = client.images.edit(image=image, mask=mask_file, prompt="a window", response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 2})
    # Without a size the output takes the image's aspect at the nearest size the model makes (sides 256+).
    assert edited.to_dict()["size"] == "384x256" and pixels(edited.data[0].b64_json).shape == (256, 384, 3)
    with open(source, "rb") as image:
        varied = client.images.edit(image=image, prompt="a window", size="256x256", response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 4, "strength": 0.5})
    assert pixels(varied.data[0].b64_json).shape == (256, 256, 3)
    assert [metadata(edited)["mode"], metadata(varied)["mode"]] == ["inpaint", "img2img"]
    assert metadata(varied)["strength"] == 0.5
    with open(tmp_path / "notes.png", "wb") as handle:
        handle.write(b"not an image")
    with open(tmp_path / "notes.png", "rb") as image, pytest.raises(openai.BadRequestError, match="notes.png") as bad:
        client.images.edit(image=image, prompt="a cat")
    assert bad.value.body["param"] == "image"
    with open(source, "rb") as image, open(tmp_path / "notes.png", "rb") as mask_file, \
            pytest.raises(openai.BadRequestError, match="notes.png") as bad:
        client.images.edit(image=image, mask=mask_file, prompt="a cat")
    assert bad.value.body["param"] == "mask"


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(client, server) -> None:
    # Queue size 2: one job runs, two wait, the next is refused.
    slow = {"prompt": "a slow job", "size": "1024x1024", "response_format": "b64_json", "extra_body": {"steps": 30}}
    outcomes: list = []

    def call() -> None:
        try:
            outcomes.append(client.images.generate(**slow))
        except openai.APIError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while server.health()[1]["queue_depth"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(prompt="one too many", size="256x256")
    assert int(caught.value.response.headers["retry-after"]) >= 1
    for thread in threads:
        thread.join(300)
    assert all(not isinstance(outcome, Exception) for outcome in outcomes)  # every accepted request completed


def test_a_client_that_disconnects_cancels_its_job(server) -> None:
    import http.client

    cancelled_before = server.metric('zimage_requests_total{outcome="cancelled"}')
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"prompt": "walk away", "size": "1024x1024", "steps": 40})
    connection.request("POST", "/v1/images/generations", body=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while not server.health()[1]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    connection.close()
    closed = time.monotonic()
    while server.health()[1]["busy"] and time.monotonic() < closed + 60:
        time.sleep(0.05)
    assert not server.health()[1]["busy"]
    print(f"\n[rest] disconnected client -> pipeline free after {time.monotonic() - closed:.2f} s")
    assert server.metric('zimage_requests_total{outcome="cancelled"}') == cancelled_before + 1


def test_the_rest_api_is_refused_beyond_loopback_without_a_key() -> None:
    assert rest_api_problem(Settings(host="0.0.0.0"), ui_auth=False) is not None
    assert "--api-key" in rest_api_problem(Settings(host="0.0.0.0"), ui_auth=False)
    assert rest_api_problem(Settings(host="0.0.0.0", api_key="k"), ui_auth=False) is None
    assert rest_api_problem(Settings(host="0.0.0.0"), ui_auth=True) is None
    assert rest_api_problem(Settings(host="127.0.0.1"), ui_auth=False) is None


@pytest.mark.parametrize("text, expected", [("1024x768", (1024, 768)), (" 512X512 ", (512, 512)), ("auto", (None, None)),
                                            (None, (None, None))])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


def test_an_openai_mask_repaints_its_transparent_pixels() -> None:
    from zimage.openai_api import _openai_mask

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 8))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    mask = Image.open(io.BytesIO(_openai_mask(buffer.getvalue(), "mask.png", 2**20)))
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((6, 1)) == 0
    opaque = io.BytesIO()
    Image.new("L", (8, 8), 255).save(opaque, format="PNG")
    assert _openai_mask(opaque.getvalue(), "mask.png", 2**20) == opaque.getvalue()  # white is repainted, as it is


def test_bodies_that_are_not_usable_json_are_bad_requests(server) -> None:
    for body in (b"[" * 100_000, b"not json", b"[1, 2]", "{\"prompt\": \"a cat\", \"size\": \"\u0662\u0665\u0666x256\"}".encode()):
        request = urllib.request.Request(server.url + "v1/images/generations", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400
        assert json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"


def in_process(service, settings: Settings):
    """The /v1 routes over ``service`` (a stand-in), called in this process without a server."""
    import fastapi
    from fastapi.testclient import TestClient

    from zimage.openai_api import build_router

    app = fastapi.FastAPI()
    app.include_router(build_router(service, settings))
    return TestClient(app)


def test_an_unforeseen_failure_is_a_500_in_the_openai_shape_and_is_logged(tmp_path: Path, caplog) -> None:
    class Broken:
        """A service with a bug: submit raises what nobody foresaw."""
        outcomes: list[str] = []

        def submit(self, request):
            raise OverflowError("int too large to convert to float")

        def count_outcome(self, outcome: str) -> None:
            self.outcomes.append(outcome)

    service = Broken()
    answer = in_process(service, Settings(outputs_dir=tmp_path)).post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"})
    assert answer.status_code == 500
    assert answer.json()["error"] == {"message": "The server failed unexpectedly (OverflowError); it logged the "
                                                 "details.", "type": "server_error", "param": None,
                                      "code": "internal_error"}
    assert service.outcomes == ["failed"]
    assert "int too large" in caplog.text  # the traceback is in the server's log, not in the answer


def test_wrong_api_keys_are_slowed_down_then_refused_for_a_while(tmp_path: Path) -> None:
    from zimage.auth import FAILURE_DELAY_S, FREE_FAILURES

    client = in_process(object(), Settings(outputs_dir=tmp_path, api_key=KEY))  # no request reaches the service
    wrong = {"Authorization": "Bearer not-the-key"}
    started = time.monotonic()
    for _ in range(FREE_FAILURES + 1):
        assert client.get("/v1/models", headers=wrong).json()["error"]["code"] == "invalid_api_key"
    assert time.monotonic() - started >= (FREE_FAILURES + 1) * FAILURE_DELAY_S  # each failure answered late
    # Past the free failures the address waits, even with the right key: guessing gets no faster with more tries.
    blocked = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "2"
    assert blocked.json()["error"]["type"] == "rate_limit_error"


def test_body_edge_cases_get_their_own_messages(tmp_path: Path) -> None:
    from zimage.errors import ValidationError

    class Recording:
        requests: list = []

        def submit(self, request):
            self.requests.append(request)
            raise ValidationError("parsed; the service stops here")

        def count_outcome(self, outcome: str) -> None:
            pass

    service = Recording()
    client = in_process(service, Settings(outputs_dir=tmp_path))
    deep = '{"prompt": "a cat", "loras": ' + "[" * 100_000 + "]" * 100_000 + "}"  # valid JSON, too deep for Python
    answer = client.post("/v1/images/generations", content=deep, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]["message"]
    digits = '{"prompt": "a cat", "n": 1' + "0" * 5000 + "}"  # valid JSON, beyond Python's 4300-digit limit
    answer = client.post("/v1/images/generations", content=digits, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "thousands of digits" in answer.json()["error"]["message"]
    png = io.BytesIO()
    Image.new("RGB", (256, 256)).save(png, format="PNG")
    for loras, expected in (("", ()), ('[["style", 0.5]]', (("style", 0.5),))):  # empty is no LoRA, as in JSON
        answer = client.post("/v1/images/edits", data={"prompt": "a cat", "loras": loras},
                             files={"image": ("in.png", png.getvalue(), "image/png")})
        assert "the service stops here" in answer.json()["error"]["message"]
        assert service.requests[-1].loras == expected
    for loras, message in (("style:0.5", "loras='style:0.5' is not JSON"),
                           ("[" * 100_000 + "]" * 100_000, "is JSON nested too deeply")):
        answer = client.post("/v1/images/edits", data={"prompt": "a cat", "loras": loras},
                             files={"image": ("in.png", png.getvalue(), "image/png")})
        assert message in answer.json()["error"]["message"] and answer.json()["error"]["param"] == "loras"

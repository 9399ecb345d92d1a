"""Sign-in covers every route but /healthz; no route restarts Gradio's queue; security headers everywhere.

Real servers on loopback (``python app.py --demo``), driven by urllib, gradio_client and headless Chromium,
plus in-process checks of the pieces in zimage/auth.py (credentials, sessions, backoff).
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from servers import start_server
from zimage.auth import (
    LOGIN_TITLE,
    SESSION_COOKIE,
    Credentials,
    FailureLimiter,
    Guard,
    Sessions,
    healthz_body,
    login_page,
)

USER, PASSWORD = "alice", "wonderland"
AUTH_ENV = {"ZIMAGE_AUTH": f"{USER}:{PASSWORD},bob:builder"}
EXPECTED_HEADERS = {
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - keep 30x answers as they are
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def basic(user: str = USER, password: str = PASSWORD) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def request(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None,
            timeout: float = 10) -> tuple[int, dict, str]:
    """(status, lower-cased headers, body) without following redirects, also for error statuses."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode(errors="replace")


def post_json(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, str]:
    return request(url, "POST", {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode())


def login(url: str, user: str = USER, password: str = PASSWORD, accept: str = "*/*", next_url: str | None = None
          ) -> tuple[int, dict, str]:
    form = {"username": user, "password": password, **({"next": next_url} if next_url else {})}
    return request(url + "login", "POST", {"Content-Type": "application/x-www-form-urlencoded", "Accept": accept},
                   urllib.parse.urlencode(form).encode())


def session_cookie(headers: dict) -> str:
    cookie = headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE + "="), cookie
    return cookie.split(";", 1)[0]


def image_path(result) -> str:
    gallery, _ = result
    first = gallery[0]["image"]
    return first if isinstance(first, str) else first["path"]


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tmp_path_factory.mktemp("auth-server"), data_dir, env=AUTH_ENV)
    yield srv
    assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------------------------------------------
# Everything but /healthz needs a sign-in

@pytest.mark.server
def test_healthz_is_open_and_tells_only_the_status(server) -> None:
    status, headers, body = request(server.url + "healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ready"}  # no model path, device, profile, error text


@pytest.mark.server
@pytest.mark.parametrize("method, path, body", [
    ("GET", "metrics", None),
    ("POST", "gradio_api/cancel", {"session_hash": "x", "fn_index": 0, "event_id": "y"}),
    ("POST", "gradio_api/reset", {"session_hash": "x", "fn_index": 0, "event_id": "y"}),
    ("GET", "gradio_api/heartbeat/some-session", None),
    ("POST", "gradio_api/queue/join", {"data": ["a cat", 256, 256, 2, 1, 1], "fn_index": 0, "session_hash": "s"}),
    ("GET", "gradio_api/queue/data?session_hash=s", None),
    ("GET", "config", None),
    ("GET", "gradio_api/info", None),
    ("GET", "gradio_api/file=/etc/hostname", None),
    ("GET", "gradio_api/monitoring/some-key", None),
    ("GET", "gradio_api/run-history/buckets", None),
    ("POST", "gradio_api/upload", {}),
    ("GET", "theme.css", None),
    ("GET", "", None),  # the page itself, asked for as JSON (an XHR)
    ("GET", "v1/models", None),  # the REST API without an API key sits behind the sign-in
    ("POST", "v1/images/generations", {"prompt": "a cat", "size": "256x256"}),
])
def test_routes_refuse_requests_without_credentials(server, method: str, path: str, body: dict | None) -> None:
    if body is None:
        status, headers, text = request(server.url + path, method)
    else:
        status, headers, text = post_json(server.url + path, body)
    assert status == 401, (path, status, text)
    if path.startswith("v1/"):  # the REST API refuses in OpenAI's error shape, as it answers its own errors
        error = json.loads(text)["error"]
        assert error["code"] == "not_authenticated" and "--api-key" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert json.loads(text)["error"] == "Not authenticated"
    # A made-up or stale session does not help either.
    status, _, _ = request(server.url + path, method, {"Cookie": f"{SESSION_COOKIE}=forged-token"},
                           None if body is None else json.dumps(body).encode())
    assert status == 401


@pytest.mark.server
def test_cancel_and_reset_work_once_signed_in(server) -> None:
    # The same calls as above pass the guard with credentials: the refusal was the sign-in, not the body.
    body = {"session_hash": "x", "fn_index": 0, "event_id": "y"}
    for path in ("gradio_api/cancel", "gradio_api/reset"):
        status, _, text = post_json(server.url + path, body, basic())
        assert status == 200, (path, text)


@pytest.mark.server
def test_a_browser_opening_the_page_is_sent_to_the_login_page(server) -> None:
    status, headers, _ = request(server.url, headers={"Accept": "text/html,application/xhtml+xml"})
    assert status == 303 and headers["location"] == "/login"
    status, headers, _ = request(server.url + "?view=api", headers={"Accept": "text/html"})
    assert status == 303
    assert headers["location"] == "/login?" + urllib.parse.urlencode({"next": "/?view=api"})
    status, headers, page = request(server.url + "login", headers={"Accept": "text/html"})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert f"<title>{LOGIN_TITLE}</title>" in page
    assert 'name="username"' in page and 'name="password"' in page


@pytest.mark.server
def test_startup_events_is_gone_for_everybody(server) -> None:
    for path in ("gradio_api/startup-events", "gradio_api/startup-events/", "gradio_api//startup-events",
                 "startup-events"):
        assert request(server.url + path)[0] == 404, path
        assert request(server.url + path, headers=basic())[0] == 404, path


@pytest.mark.server
def test_basic_credentials_open_metrics_and_the_api(server) -> None:
    status, _, text = request(server.url + "metrics", headers=basic())
    assert status == 200 and "zimage_requests_total" in text
    status, _, text = request(server.url + "metrics", headers=basic("bob", "builder"))
    assert status == 200
    status, _, text = request(server.url + "config", headers=basic())
    # Gradio's own check agrees (auth_dependency): it knows who asks.
    assert status == 200 and json.loads(text)["username"] == USER
    started = time.monotonic()
    status, _, text = request(server.url + "metrics", headers=basic(USER, "wrong"))
    assert status == 401 and json.loads(text)["error"] == "Incorrect credentials"  # not "Not authenticated"
    assert time.monotonic() - started >= 0.4  # failed attempts are slowed down
    assert request(server.url + "metrics", headers=basic("bob", PASSWORD))[0] == 401  # pairs do not mix
    assert request(server.url + "metrics", headers={"Authorization": "Basic !!notbase64"})[0] == 401
    assert request(server.url + "metrics", headers={"Authorization": "Bearer " + PASSWORD})[0] == 401


@pytest.mark.server
def test_the_openai_client_reads_the_sign_in_refusal_and_passes_with_basic_credentials(server) -> None:
    import openai

    refused = openai.OpenAI(base_url=server.url + "v1", api_key="no-key-on-this-server", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        refused.models.list()
    assert caught.value.code == "not_authenticated" and "sign-in" in caught.value.message
    wrong = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0,
                          default_headers=basic(USER, "not-the-password"))
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_credentials" and "Wrong user name or password" in caught.value.message
    # The fix the message gives: the SDK's default_headers replace its Bearer header with Basic credentials.
    signed_in = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0,
                              default_headers=basic())
    assert [model.id for model in signed_in.models.list()] == ["demo"]


@pytest.mark.server
def test_form_login_gives_a_session_that_logout_ends(server) -> None:
    status, headers, text = login(server.url)
    assert status == 200 and json.loads(text) == {"success": True}  # what gradio_client expects
    raw_cookie = headers["set-cookie"].lower()
    assert "httponly" in raw_cookie and "samesite=strict" in raw_cookie and "path=/" in raw_cookie
    cookie = session_cookie(headers)
    assert request(server.url + "metrics", headers={"Cookie": cookie})[0] == 200
    status, headers, _ = request(server.url, headers={"Cookie": cookie, "Accept": "text/html"})
    assert status == 200 and "text/html" in headers["content-type"]
    status, headers, _ = request(server.url + "logout", headers={"Cookie": cookie})
    assert status == 303 and headers["location"] == "/login"
    assert request(server.url + "metrics", headers={"Cookie": cookie})[0] == 401


@pytest.mark.server
def test_browser_form_login_redirects_only_to_local_pages(server) -> None:
    status, headers, _ = login(server.url, accept="text/html", next_url="/?view=api")
    assert status == 303 and headers["location"] == "/?view=api"
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        status, headers, _ = login(server.url, accept="text/html", next_url=evil)
        assert status == 303 and headers["location"] == "/", evil
    status, _, page = login(server.url, password="wrong", accept="text/html")
    assert status == 401 and "Wrong user name or password." in page and 'type="password"' in page
    status, _, text = login(server.url, password="wrong")
    assert status == 401 and json.loads(text)["error"] == "Incorrect credentials"


@pytest.mark.server
def test_gradio_client_signs_in_and_generates(server, tmp_path: Path) -> None:
    from gradio_client import Client

    with pytest.raises(Exception):
        Client(server.url, verbose=False, download_files=str(tmp_path)).predict(
            "a cat", 256, 256, 2, 1, 1, api_name="/generate")
    with pytest.raises(Exception, match="(?i)invalid credentials"):
        Client(server.url, verbose=False, download_files=str(tmp_path), auth=(USER, "wrong"))
    client = Client(server.url, verbose=False, download_files=str(tmp_path), auth=(USER, PASSWORD))
    result = client.predict("a cat", 256, 256, 2, 1, 1, api_name="/generate")
    assert Path(image_path(result)).is_file()
    # The saved image is served to a signed-in user only.
    saved = sorted(server.outputs.glob("*.png"))[-1]
    url = server.url + "gradio_api/file=" + urllib.parse.quote(str(saved))
    assert request(url)[0] == 401
    status, headers, _ = request(url, headers=basic())
    assert status == 200 and headers["content-type"] == "image/png", (status, headers)


@pytest.mark.server
def test_security_headers_on_every_kind_of_response(server) -> None:
    for path, headers in (("", {"Accept": "text/html"}), ("", basic()), ("healthz", {}), ("login", {}),
                          ("metrics", {}), ("gradio_api/startup-events", {}), ("config", basic())):
        _, got, _ = request(server.url + path, headers=headers)
        for name, value in EXPECTED_HEADERS.items():
            assert got.get(name) == value, (path, name, got)


# ---------------------------------------------------------------------------------------------------
# --metrics-public, and a server without auth

@pytest.mark.server
def test_metrics_public_opens_metrics_only_and_an_api_key_opens_the_rest_api(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, data_dir, "--metrics-public", "--api-key", "rest-key", env=AUTH_ENV)
    try:
        status, _, text = request(srv.url + "metrics")
        assert status == 200 and "zimage_model_ready 1.0" in text
        # With a key, /v1 checks the key itself, instead of the sign-in.
        assert request(srv.url + "v1/models", headers={"Authorization": "Bearer rest-key"})[0] == 200
        status, _, text = request(srv.url + "v1/models", headers=basic())
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert request(srv.url + "config")[0] == 401
        assert request(srv.url + "gradio_api/info")[0] == 401
        assert post_json(srv.url + "gradio_api/cancel", {"session_hash": "x", "fn_index": 0, "event_id": "y"}
                         )[0] == 401
        assert json.loads(request(srv.url + "healthz")[2]) == {"status": "ready"}
        # Repeated wrong passwords from one address: after a few, it has to wait (429 with Retry-After).
        statuses = [login(srv.url, password=f"guess{i}")[0] for i in range(7)]
        assert statuses[:5] == [401] * 5 and statuses[-1] == 429, statuses
        status, headers, text = login(srv.url)
        assert status == 429 and int(headers["retry-after"]) >= 1 and "try again" in text
        assert request(srv.url + "config", headers=basic())[0] == 429  # Basic is throttled alike
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.server
def test_without_auth_healthz_keeps_its_fields_and_startup_events_is_gone(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, data_dir)
    try:
        status, headers, text = request(srv.url + "healthz")
        body = json.loads(text)
        assert status == 200 and {"status", "model", "device", "profile", "queue_depth", "busy"} <= set(body)
        for name, value in EXPECTED_HEADERS.items():
            assert headers.get(name) == value, name
        assert request(srv.url + "gradio_api/startup-events")[0] == 404
        assert request(srv.url + "metrics")[0] == 200
        assert request(srv.url + "config")[0] == 200
        assert request(srv.url + "login")[0] != 200  # no sign-in page when there is nothing to sign in to
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------------------------------------------
# A person signing in with headless Chromium

@pytest.mark.server
@pytest.mark.browser
def test_sign_in_in_a_browser_and_generate(server) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/install.sh --dev (apt package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url, wait_until="domcontentloaded")
            assert page.url.endswith("/login") and page.title() == LOGIN_TITLE
            page.get_by_label("User name").fill(USER)
            page.get_by_label("Password").fill("not the password")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Wrong user name or password.").wait_for(timeout=10_000)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            assert page.url == server.url
            generate = page.get_by_role("button", name="Generate", exact=True)
            generate.wait_for(state="visible", timeout=30_000)
            # The page's own calls (config, queue, its event stream, the image file) pass with the cookie.
            page.locator("#prompt textarea").fill("a cat behind a login")
            generate.click()
            page.wait_for_function("() => [...document.querySelectorAll('#result img')].some("
                                   "img => img.complete && img.naturalWidth >= 256)", timeout=120_000)
            page.close()
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------------
# The pieces, in-process

def test_credentials_match_whole_pairs_only() -> None:
    credentials = Credentials([("alice", "wonderland"), ("bob", "builder")])
    assert credentials.check("alice", "wonderland") == "alice"
    assert credentials.check("bob", "builder") == "bob"
    assert credentials.check("alice", "builder") is None
    assert credentials.check("alice", "wonderland ") is None
    assert credentials.check("", "") is None
    assert credentials.check("çé", "ü") is None  # non-ASCII input is compared, not an error
    assert Credentials([]).check("alice", "wonderland") is None


def test_sessions_expire_and_end() -> None:
    now = [1000.0]
    sessions = Sessions(ttl_s=60, max_sessions=2, clock=lambda: now[0])
    first = sessions.create("alice")
    assert sessions.user(first) == "alice" and sessions.user("nope") is None and sessions.user(None) is None
    second, third = sessions.create("bob"), sessions.create("carol")
    assert sessions.user(first) is None  # the oldest went when the cap was reached
    sessions.end(second)
    assert sessions.user(second) is None and sessions.user(third) == "carol"
    now[0] += 61
    assert sessions.user(third) is None


def test_backoff_grows_after_free_failures_and_resets_on_success() -> None:
    now = [0.0]
    limiter = FailureLimiter(free_failures=2, max_backoff_s=5, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.retry_after("a") == 0
    limiter.failed("a")
    assert limiter.retry_after("a") == 2 and limiter.retry_after("b") == 0
    limiter.failed("a")
    assert limiter.retry_after("a") == 4
    limiter.failed("a")
    assert limiter.retry_after("a") == 5  # capped
    now[0] += 5
    assert limiter.retry_after("a") == 0
    limiter.succeeded("a")
    limiter.failed("a")
    assert limiter.retry_after("a") == 0


def test_healthz_body_and_login_page_escape() -> None:
    body = {"status": "failed", "model": "/secret/path", "error": "boom at /secret/path"}
    assert healthz_body(body, Guard([("a", "b")])) == {"status": "failed"}
    assert healthz_body(body, Guard([])) == body
    page = login_page(error="<script>x</script>", next_url='/"><script>', username="<b>")
    assert "<script>x" not in page and '"><script>' not in page and "<b>" not in page

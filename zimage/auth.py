"""Sign-in for the whole web app: one guard in front of every route, Gradio's included.

Gradio's own ``auth=`` protects only the routes that declare its ``login_check``; others (the queue's
cancel, heartbeat, reset, startup-events, our ``/metrics``) answered anybody. Here the sign-in is
ours and is checked once, in an ASGI middleware, before any route runs:

* a signed-in browser carries a random session token in an ``HttpOnly``, ``SameSite=Strict`` cookie
  (``POST /login`` with the form fields ``username`` and ``password``, the same form
  ``gradio_client.Client(url, auth=(user, password))`` posts); sessions live in this process only,
  so a restart signs everybody out;
* scripts and Prometheus may instead send HTTP Basic credentials (``Authorization`` header) with
  the same ``user:password`` pairs;
* everything else is refused: 401 JSON for API calls, a redirect to ``/login`` for a browser opening
  a page. ``/healthz`` (and ``/metrics`` with ``--metrics-public``) stays open.

Gradio learns the user through the documented ``mount_gradio_app(..., auth_dependency=...)``, so its
own checks agree and ``gr.Request.username`` is set. Failed sign-ins are slowed down per client.

Independently of sign-in, :func:`install` refuses ``startup-events`` (a GET there would restart
Gradio's queue; ``mount_gradio_app`` already starts it in the app's lifespan) and adds standard
security headers to every response.
"""

from __future__ import annotations

import base64
import binascii
import html
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import openai_error_body

SESSION_COOKIE = "zimage_session"
#: How long a sign-in lasts (the cookie's Max-Age and the server-side expiry).
SESSION_TTL_S = 7 * 24 * 3600
#: Sessions kept at most; the oldest are dropped first when more sign in.
MAX_SESSIONS = 10_000
#: Every failed sign-in (form or Basic) is answered after this delay.
FAILURE_DELAY_S = 0.5
#: Failures a client may make before it has to wait; then 2, 4, 8 ... seconds, at most BACKOFF_MAX_S.
FREE_FAILURES = 5
BACKOFF_MAX_S = 300.0
#: A client's failure record is forgotten after this long without a new failure.
FAILURE_MEMORY_S = 900.0
MAX_LOGIN_BODY_BYTES = 8192
LOGIN_TITLE = "Z-Image-Turbo: sign in"
#: Paths always served without sign-in (besides /login, /logout).
PUBLIC_PATHS = frozenset({"/healthz"})
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
#: Key in the ASGI scope holding the signed-in user, for :meth:`Guard.current_user`.
SCOPE_USER_KEY = "zimage.user"


# ---------------------------------------------------------------------------------------------------
# Credentials, sessions, failures


class Credentials:
    """The allowed ``(user, password)`` pairs, compared in constant time."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = [(user.encode(), password.encode()) for user, password in pairs]

    def check(self, user: str, password: str) -> str | None:
        """The user name when the pair is one of the allowed ones, else None."""
        given_user, given_password = user.encode(), password.encode()
        ok = False
        for allowed_user, allowed_password in self._pairs:
            # Both comparisons always run: the time does not tell which part was wrong.
            user_ok = secrets.compare_digest(given_user, allowed_user)
            password_ok = secrets.compare_digest(given_password, allowed_password)
            ok |= user_ok & password_ok
        return user if ok else None


class Sessions:
    """Random session tokens -> user name, in memory, with an expiry."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for old in [t for t, (_, expires) in self._sessions.items() if expires <= now]:
                del self._sessions[old]
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[next(iter(self._sessions))]  # dicts keep insertion order: the oldest
            self._sessions[token] = (user, now + self.ttl_s)
        return token

    def user(self, token: str | None) -> str | None:
        if not token:
            return None
        with self._lock:
            entry = self._sessions.get(token)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._sessions[token]
                return None
            return entry[0]

    def end(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(token, None)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


@dataclass
class FailureLimiter:
    """Per-client backoff after failed sign-ins: FREE_FAILURES free, then 2, 4, 8 ... s of refusal."""

    free_failures: int = FREE_FAILURES
    max_backoff_s: float = BACKOFF_MAX_S
    memory_s: float = FAILURE_MEMORY_S
    clock: Callable[[], float] = time.monotonic
    _clients: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str) -> float:
        """Seconds this client must still wait before its credentials are checked again (0: go ahead)."""
        with self._lock:
            record = self._clients.get(client)
            return max(0.0, record.blocked_until - self.clock()) if record else 0.0

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._clients) > 10_000:
                for key in [k for k, r in self._clients.items() if now - r.last > self.memory_s]:
                    del self._clients[key]
            record = self._clients.get(client)
            if record is None or now - record.last > self.memory_s:
                record = self._clients[client] = _Failures()
            record.count += 1
            record.last = now
            if record.count > self.free_failures:
                wait = min(2.0 ** (record.count - self.free_failures), self.max_backoff_s)
                record.blocked_until = now + wait

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


# ---------------------------------------------------------------------------------------------------
# Small ASGI helpers


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: dict, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _basic_credentials(scope: dict) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic`` header, or None when there is none."""
    raw = _header(scope, b"authorization")
    if not raw:
        return None
    scheme, _, encoded = raw.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")  # malformed: counts as wrong credentials
    user, _, password = decoded.partition(":")
    return user, password


def _client_key(scope: dict) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _mount_prefix(scope: dict) -> str:
    return (scope.get("root_path") or "").rstrip("/")


def _app_path(scope: dict) -> str:
    """The request path without the deployment prefix (``root_path``), if the server set one."""
    path = scope.get("path") or "/"
    prefix = _mount_prefix(scope)
    if prefix and path.startswith(prefix + "/"):
        path = path[len(prefix):]
    return path


def _wants_html(scope: dict) -> bool:
    return scope.get("method") in ("GET", "HEAD") and "text/html" in (_header(scope, b"accept") or "")


def _is_startup_events(path: str) -> bool:
    normalized = "/" + "/".join(part for part in path.split("/") if part)
    return normalized.endswith("/startup-events")


def _safe_next(value: str | None) -> str:
    """A local path to go to after sign-in; anything else (another site, odd characters) becomes ``/``."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "/"
    return value


def _json(status: int, body: dict, headers: dict | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers={"cache-control": "no-store", **(headers or {})})


# ---------------------------------------------------------------------------------------------------
# The guard


class Guard:
    """Who may use the app. ``enabled`` is False when no ``user:password`` pair is configured."""

    def __init__(self, pairs: Sequence[tuple[str, str]], *, metrics_public: bool = False,
                 failure_delay_s: float = FAILURE_DELAY_S, open_prefixes: tuple[str, ...] = (),
                 openai_prefixes: tuple[str, ...] = ()) -> None:
        """``open_prefixes``: paths that check their own credentials (the REST API with its API key);
        ``openai_prefixes``: paths whose refusals are in OpenAI's error shape (the REST API behind the sign-in),
        so its clients read them as they read the API's own errors."""
        self.enabled = bool(pairs)
        self.credentials = Credentials(pairs)
        self.sessions = Sessions()
        self.failures = FailureLimiter()
        self.failure_delay_s = failure_delay_s
        self.public_paths = PUBLIC_PATHS | ({"/metrics"} if metrics_public else frozenset())
        self.open_prefixes = open_prefixes
        self.openai_prefixes = openai_prefixes

    # -- identification -----------------------------------------------------------------------------

    def _session_user(self, scope: dict) -> str | None:
        return self.sessions.user(_cookie(scope, SESSION_COOKIE))

    def current_user(self, request: Any) -> str | None:
        """Gradio's ``auth_dependency``: the signed-in user of a request, or None."""
        scope = request.scope
        if SCOPE_USER_KEY in scope:
            return scope[SCOPE_USER_KEY]
        user = self._session_user(scope)
        if user is None:
            basic = _basic_credentials(scope)
            if basic is not None:
                user = self.credentials.check(*basic)
        return user

    async def _failed(self, client: str) -> None:
        import asyncio

        self.failures.failed(client)
        await asyncio.sleep(self.failure_delay_s)

    # -- responses ----------------------------------------------------------------------------------

    def _refusal(self, scope: dict, wrong: bool = False) -> Any:
        """The answer to a request without a session: a redirect to the sign-in page for a browser, else 401
        (``wrong``: it sent Basic credentials that are not a known pair)."""
        from starlette.responses import RedirectResponse

        if _wants_html(scope):
            target = _app_path(scope)
            query = scope.get("query_string", b"").decode("latin-1")
            next_url = target + ("?" + query if query else "")
            location = f"{_mount_prefix(scope)}/login"
            if next_url != "/":
                location += "?" + urllib.parse.urlencode({"next": next_url})
            return RedirectResponse(location, status_code=303, headers={"cache-control": "no-store"})
        if wrong:
            message = "Wrong user name or password in the HTTP Basic credentials."
            if _app_path(scope).startswith(self.openai_prefixes):
                return _json(401, openai_error_body(message, "invalid_request_error", "invalid_credentials"))
            return _json(401, {"error": "Incorrect credentials", "detail": message})
        if _app_path(scope).startswith(self.openai_prefixes):
            return _json(401, openai_error_body(
                "Not signed in: this server's REST API sits behind its sign-in. Send HTTP Basic credentials of a "
                "user:password pair (openai SDK: default_headers={'Authorization': 'Basic ...'}), or ask the "
                "operator to start it with --api-key and send that key as the SDK's api_key.",
                "invalid_request_error", "not_authenticated"))
        return _json(401, {"error": "Not authenticated",
                           "detail": "Sign in at /login (gradio_client: Client(url, auth=(user, password))) "
                                     "or send HTTP Basic credentials."})

    def _too_many(self, scope: dict, wait_s: float) -> Any:
        seconds = max(1, int(wait_s + 0.999))
        message = f"Too many failed sign-ins from this address: try again in {seconds} s."
        if _app_path(scope).startswith(self.openai_prefixes):
            return _json(429, openai_error_body(message, "rate_limit_error", "too_many_failed_sign_ins"),
                         headers={"retry-after": str(seconds)})
        if "text/html" in (_header(scope, b"accept") or ""):
            from starlette.responses import HTMLResponse

            return HTMLResponse(login_page(error=message), status_code=429,
                                headers={"retry-after": str(seconds), "cache-control": "no-store"})
        return _json(429, {"error": "Too many failed sign-ins", "detail": message},
                     headers={"retry-after": str(seconds)})

    # -- ASGI middleware ----------------------------------------------------------------------------

    def middleware(self, app: Any) -> Callable:
        """Wrap an ASGI app: refuse startup-events always, and unsigned requests when auth is on."""
        guard = self

        async def guarded(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            path = _app_path(scope)
            if _is_startup_events(path):
                # Gradio's lifespan already ran its startup events; a request here would restart the queue.
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await _json(404, {"detail": "Not Found"})(scope, receive, send)
                return
            if (not guard.enabled or path in guard.public_paths or path in ("/login", "/logout")
                    or path.startswith(guard.open_prefixes)):
                await app(scope, receive, send)
                return
            user = guard._session_user(scope)
            if user is None:
                basic = _basic_credentials(scope)
                if basic is not None:
                    client = _client_key(scope)
                    wait = guard.failures.retry_after(client)
                    if wait > 0:
                        if scope["type"] == "websocket":
                            await send({"type": "websocket.close", "code": 1008})
                        else:
                            await guard._too_many(scope, wait)(scope, receive, send)
                        return
                    user = guard.credentials.check(*basic)
                    if user is None:
                        await guard._failed(client)
                    else:
                        guard.failures.succeeded(client)
            if user is None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await guard._refusal(scope, wrong=basic is not None)(scope, receive, send)
                return
            scope[SCOPE_USER_KEY] = user
            await app(scope, receive, send)

        return guarded

    # -- routes -------------------------------------------------------------------------------------

    async def login_get(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse, RedirectResponse

        next_url = _safe_next(request.query_params.get("next"))
        if self._session_user(request.scope) is not None:
            return RedirectResponse(_mount_prefix(request.scope) + next_url, status_code=303)
        return HTMLResponse(login_page(next_url=next_url), headers={"cache-control": "no-store"})

    async def login_post(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse

        scope = request.scope
        browser = "text/html" in (request.headers.get("accept") or "")
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _json(415, {"error": "Unsupported form",
                               "detail": "POST /login as application/x-www-form-urlencoded with the fields "
                                         "username and password."})
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY_BYTES:
                return _json(413, {"error": "Form too large",
                                   "detail": f"The sign-in form is at most {MAX_LOGIN_BODY_BYTES} bytes."})
        form = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        username = (form.get("username") or [""])[0].strip()
        password = (form.get("password") or [""])[0]
        next_url = _safe_next((form.get("next") or [None])[0] or request.query_params.get("next"))
        client = _client_key(scope)
        wait = self.failures.retry_after(client)
        if wait > 0:
            return self._too_many(scope, wait)
        user = self.credentials.check(username, password) if username and password else None
        if user is None:
            await self._failed(client)
            if browser:
                return HTMLResponse(login_page(error="Wrong user name or password.", next_url=next_url,
                                               username=username), status_code=401,
                                    headers={"cache-control": "no-store"})
            return _json(401, {"error": "Incorrect credentials"})
        self.failures.succeeded(client)
        self.sessions.end(_cookie(scope, SESSION_COOKIE))  # a new token at every sign-in
        token = self.sessions.create(user)
        if browser:
            response: Any = RedirectResponse(_mount_prefix(scope) + next_url, status_code=303)
        else:
            response = JSONResponse({"success": True})
        response.headers["cache-control"] = "no-store"
        response.set_cookie(SESSION_COOKIE, token, max_age=int(self.sessions.ttl_s), path="/",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Any) -> Any:
        from starlette.responses import RedirectResponse

        self.sessions.end(_cookie(request.scope, SESSION_COOKIE))
        response = RedirectResponse(_mount_prefix(request.scope) + "/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        response.headers["cache-control"] = "no-store"
        return response


def login_page(*, error: str = "", next_url: str = "/", username: str = "") -> str:
    """The sign-in page: a plain form, no script, no external resource."""
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>{html.escape(LOGIN_TITLE)}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f6f7; display: flex; justify-content: center;
       align-items: center; min-height: 100vh; margin: 0; }}
form {{ background: #fff; padding: 2rem; border-radius: 8px; box-shadow: 0 1px 4px rgba(0,0,0,.15);
       display: flex; flex-direction: column; gap: .75rem; min-width: 18rem; }}
h1 {{ font-size: 1.25rem; margin: 0 0 .5rem; }}
input {{ padding: .5rem; font-size: 1rem; }}
button {{ padding: .6rem; font-size: 1rem; background: #f97316; color: #fff; border: 0; border-radius: 4px;
         cursor: pointer; }}
.error {{ color: #b91c1c; margin: 0; }}
</style>
</head>
<body>
<form method="post" action="login">
<h1>{html.escape(LOGIN_TITLE)}</h1>
{message}
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required autofocus value="{html.escape(username)}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<input type="hidden" name="next" value="{html.escape(next_url)}">
<button type="submit">Sign in</button>
</form>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------------
# Security headers


def security_headers(app: Any) -> Callable:
    """Wrap an ASGI app so that every HTTP response carries :data:`SECURITY_HEADERS` (unless already set)."""

    async def with_headers(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {key.lower() for key, _ in headers}
                headers.extend((key, value) for key, value in SECURITY_HEADERS if key not in present)
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_headers)

    return with_headers


class _Wrap:
    """Starlette ``add_middleware`` wants a class: this one applies a wrapper function to the app."""

    def __init__(self, app: Any, wrapper: Callable[[Any], Callable]) -> None:
        self._wrapped = wrapper(app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._wrapped(scope, receive, send)


def install(app: Any, guard: Guard) -> Callable[[Any], str | None] | None:
    """Add the sign-in routes (when auth is on), the guard and the security headers to a FastAPI app.

    Call it after the app's other middleware and before ``gr.mount_gradio_app`` (the routes must come
    before Gradio's mount). Returns the ``auth_dependency`` for ``mount_gradio_app``, or None when
    authentication is off.
    """
    if guard.enabled:
        app.add_route("/login", guard.login_get, methods=["GET"], include_in_schema=False)
        app.add_route("/login", guard.login_post, methods=["POST"], include_in_schema=False)
        app.add_route("/logout", guard.logout, methods=["GET", "POST"], include_in_schema=False)
    # Added last is outermost: the headers also go on the guard's own refusals.
    app.add_middleware(_Wrap, wrapper=guard.middleware)
    app.add_middleware(_Wrap, wrapper=security_headers)
    return guard.current_user if guard.enabled else None


def healthz_body(body: dict, guard: Guard) -> dict:
    """What ``/healthz`` may tell anybody: everything without auth, only the status with auth on."""
    return {"status": body["status"]} if guard.enabled else body


__all__ = ["Guard", "install", "healthz_body", "login_page", "Credentials", "Sessions", "FailureLimiter",
           "SESSION_COOKIE", "LOGIN_TITLE", "SECURITY_HEADERS"]

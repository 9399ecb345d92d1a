"""An OpenAI-compatible images API over the generation service: ``/v1/images/generations``, ``/v1/images/edits``,
``/v1/models``, and ``/v1/files/{name}`` for the images of ``response_format="url"``.

Shapes follow OpenAI's Images API (``created``, ``data[].b64_json | url``; errors as
``{"error": {"message", "type", "param", "code"}}``), so the official ``openai`` SDKs, Open WebUI or LibreChat work
unchanged; this server's extensions are extra fields (``seed``, ``steps``, ``guidance_scale``, ``negative_prompt``,
``loras``, ``strength``; per image ``seed`` and ``timings``). Every request is a job of the same service as the web
page: the same queue bound, limits and validation. The router is a thin mapping: it parses, submits, waits (and
cancels the job when the client disconnects), and maps the service's typed errors to statuses:

=================================  ======  =======================================
error                              status  OpenAI error type (the SDK's exception)
=================================  ======  =======================================
invalid value, unknown field       400     invalid_request_error (BadRequestError)
no or wrong API key                401     invalid_request_error (AuthenticationError)
REST API off (exposed, no key)     403     invalid_request_error (PermissionDeniedError)
queue full                         429     rate_limit_error, ``Retry-After`` (RateLimitError)
model loading / shutting down      503     server_error, ``Retry-After`` (InternalServerError)
generation failed                  500     server_error, with the request id (InternalServerError)
=================================  ======  =======================================

:func:`build_router` is used by the web app (:mod:`zimage.web`) and by each Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path
from typing import Any

import fastapi  # the REST door is FastAPI's (its handlers' annotations are resolved from this module's names)

from .auth import FAILURE_DELAY_S, FailureLimiter
from .errors import GenerationCancelled, QueueFull, ServiceNotReady, ValidationError, ZImageError
from .errors import first_line as _first_line
from .errors import openai_error_body
from .errors import shown as _shown
from .jobs import watch
from .lora import loras_from_request
from .service import MAX_IMAGES, GenerationRequest, GenerationService
from .settings import Settings

log = logging.getLogger("zimage.openai_api")

#: How often a waiting request checks that its client is still connected, in seconds.
DISCONNECT_CHECK_S = 0.25
#: How long a signed image URL stays valid, in seconds (OpenAI's own image URLs expire after an hour).
URL_TTL_S = 3600
#: Retry-After for a model that is still loading or a server that is stopping, in seconds.
NOT_READY_RETRY_S = 10
#: OpenAI request fields accepted and ignored: clients send them, and they have no meaning for this model.
IGNORED_FIELDS = frozenset({"quality", "style", "user", "moderation", "background", "output_compression"})
_GENERATION_FIELDS = frozenset({"prompt", "n", "size", "response_format", "model", "output_format", "seed", "steps",
                                "guidance_scale", "negative_prompt", "loras"}) | IGNORED_FIELDS
_EDIT_FIELDS = _GENERATION_FIELDS | {"strength", "image", "image[]", "mask"}
_SIZE = re.compile(r"^\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*$")  # ASCII digits only
_FILE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,200}\.png$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None, counted: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s
        self.counted = counted  # the service counted this refusal already

    def response(self, replica_id: str | None = None) -> Any:
        from fastapi.responses import JSONResponse

        headers = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}
        if replica_id:
            headers["x-zimage-replica"] = replica_id
        body = openai_error_body(self.message, self.type, self.code, self.param)
        return JSONResponse(body, status_code=self.status, headers=headers)


#: The service's request fields that OpenAI's Images API names otherwise (the rest keep their names: the extensions
#: steps, seed, guidance_scale, negative_prompt, loras; prompt, image and mask as in OpenAI's edits).
OPENAI_PARAM = {"width": "size", "height": "size", "num_images": "n"}


def openai_param(param: str | None) -> str | None:
    """The field of this API's request that a service :class:`ValidationError`'s ``param`` stands for (None: none)."""
    return OPENAI_PARAM.get(param, param) if param is not None else None


def parse_size(value: Any) -> tuple[int | None, int | None]:
    """``"WIDTHxHEIGHT"`` to (width, height); ``None`` or ``"auto"`` to (None, None): the default size.

    Raises :class:`ApiError` (400) for anything else; the range and the multiple of 16 are the service's checks."""
    if value is None or value == "auto":
        return None, None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ApiError(400, f"size={_shown(value)} is not valid: write it as \"WIDTHxHEIGHT\", e.g. \"1024x1024\" "
                            "(sides 256-2048, multiples of 16), or \"auto\".", param="size")
    return int(match.group(1)), int(match.group(2))


class UrlSigner:
    """Signed, expiring links to saved images (``/v1/files/NAME?expires=T&signature=S``), so a URL can be
    fetched without the API key (as an image tag in a chat client) and only for ``URL_TTL_S`` seconds.

    The key is ``key`` when given (Ray Serve: one random key shared by every replica), else derived from the API key
    when there is one (every replica and process with the same key signs alike), else random per process."""

    def __init__(self, api_key: str, key: bytes | None = None) -> None:
        self._key = key or (hashlib.sha256(b"zimage-url:" + api_key.encode()).digest() if api_key
                            else secrets.token_bytes(32))

    def sign(self, name: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + URL_TTL_S)
        return f"expires={expires}&signature={self._signature(name, expires)}"

    def check(self, name: str, expires: Any, signature: Any, now: float | None = None) -> bool:
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if expires_at < (time.time() if now is None else now) or not isinstance(signature, str):
            return False
        return hmac.compare_digest(self._signature(name, expires_at), signature)

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()


def model_id(settings: Settings) -> str:
    """The model's id for ``/v1/models`` and answers: "demo", the hub id, or a local folder's name (a client is
    not told this machine's paths)."""
    if settings.demo:
        return "demo"
    local = Path(settings.model).expanduser()
    return local.name if local.is_dir() else settings.model


def rest_api_problem(settings: Settings, ui_auth: bool) -> str | None:
    """Why the REST API must stay closed, or None: a server listening beyond loopback with neither an API key nor
    sign-in would let anybody on the network spend its GPU."""
    if settings.api_key or ui_auth or settings.host in LOOPBACK_HOSTS:
        return None
    return (f"the REST API is off: this server listens on {settings.host} without --api-key (ZIMAGE_API_KEY) or "
            "sign-in, so anybody who can reach it could use it. Start it with --api-key KEY.")


def build_router(service: GenerationService, settings: Settings, *, replica_id: str | None = None,
                 ui_auth: bool = False, url_key: bytes | None = None) -> Any:
    """The ``/v1`` routes over ``service``.

    ``replica_id`` (Ray Serve) is returned in an ``X-Zimage-Replica`` header and a ``replica`` field;
    ``ui_auth``: the web app's sign-in guards these routes already (used when there is no API key);
    ``url_key``: the key signing image URLs, the same in every replica (Ray Serve), so that any replica serves a
    link another one gave (see :class:`UrlSigner`).
    """
    from fastapi.responses import FileResponse, JSONResponse

    router = fastapi.APIRouter()
    signer = UrlSigner(settings.api_key, url_key)
    closed = rest_api_problem(settings, ui_auth)
    outputs = Path(settings.outputs_dir).resolve()

    # Wrong keys are slowed down and then refused for a while, per client address, as failed sign-ins are.
    failures = FailureLimiter()

    async def authorize(request: Any) -> None:
        if closed is not None:
            raise ApiError(403, closed, code="rest_api_disabled")
        if not settings.api_key:
            return
        client = request.client.host if request.client else "unknown"
        wait_s = failures.retry_after(client)
        if wait_s > 0:
            seconds = max(1, math.ceil(wait_s))
            raise ApiError(429, f"Too many wrong API keys from this address: try again in {seconds} s.",
                           type_="rate_limit_error", code="too_many_failed_keys", retry_after_s=seconds)
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            failures.failed(client)
            await asyncio.sleep(FAILURE_DELAY_S)
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY' (the openai "
                                "SDK's api_key).", code="invalid_api_key")
        failures.succeeded(client)

    def answer(body: dict, status: int = 200, headers: dict | None = None) -> Any:
        headers = dict(headers or {})
        if replica_id:
            headers["x-zimage-replica"] = replica_id
            body = {**body, "replica": replica_id}
        return JSONResponse(body, status_code=status, headers=headers)

    async def run(request: Any, job_request: GenerationRequest, response_format: Any, model: Any) -> Any:
        if response_format not in (None, "b64_json", "url"):
            raise ApiError(400, f"response_format={_shown(response_format)} is not valid: use \"b64_json\" (the "
                                "default) or \"url\".", param="response_format")
        try:
            job = service.submit(job_request)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type_="rate_limit_error", code="queue_full",
                           retry_after_s=exc.retry_after_s, counted=True) from None
        except ValidationError as exc:
            raise ApiError(400, str(exc), param=openai_param(exc.param), counted=True) from None
        except ServiceNotReady as exc:
            raise ApiError(503, str(exc), type_="server_error", code="not_ready",
                           retry_after_s=NOT_READY_RETRY_S, counted=True) from None
        try:
            async for state in watch(job, DISCONNECT_CHECK_S):
                if not state.final and await request.is_disconnected():
                    job.cancel("the client went away")
        finally:
            if not job.done:  # the handler itself was cancelled (server stopping, connection torn down)
                job.cancel("the client went away")
        try:
            result = job.result()
        except GenerationCancelled:
            raise ApiError(500, f"The generation was cancelled (request {job.id}).", type_="server_error",
                           code="cancelled") from None
        except ZImageError as exc:
            raise ApiError(500, f"{exc} (request {job.id})", type_="server_error", code="generation_failed") from None
        info = result.info()
        data = []
        for path, seed in zip(result.paths, result.seeds):
            item: dict[str, Any] = {"seed": seed, "timings": info["timings"]}
            if response_format == "url":
                item["url"] = f"{str(request.base_url).rstrip('/')}/v1/files/{path.name}?{signer.sign(path.name)}"
            else:
                item["b64_json"] = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            data.append(item)
        body = {"created": int(time.time()), "data": data, "model": model if isinstance(model, str) and model
                else model_id(settings), "request_id": result.request_id, "output_format": "png",
                "size": f"{info['width']}x{info['height']}", "warnings": info["warnings"]}
        return answer(body)

    def request_from(fields: dict, allowed: frozenset, what: str, **files: Any) -> GenerationRequest:
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ApiError(400, f"{what} does not take {', '.join(map(repr, unknown))}: its fields are prompt, n, "
                                "size, response_format, model, seed, steps, guidance_scale, negative_prompt, loras"
                                + (", strength, image, mask" if "strength" in allowed else "") + ".",
                           param=unknown[0])
        if fields.get("output_format") not in (None, "png"):
            raise ApiError(400, f"output_format={_shown(fields['output_format'])} is not available: this server "
                                "writes PNG.", param="output_format")
        if "prompt" not in fields:
            raise ApiError(400, "prompt is required: describe the image.", param="prompt")
        width, height = parse_size(fields.get("size"))
        n = fields.get("n", 1)
        if type(n) is not int or not 1 <= n <= MAX_IMAGES:
            raise ApiError(400, f"n={_shown(n)} is not valid: use a whole number from 1 to {MAX_IMAGES}.", param="n")
        seed = fields.get("seed")
        try:
            loras = loras_from_request(fields.get("loras"))
        except ValidationError as exc:
            raise ApiError(400, str(exc), param="loras") from None
        values: dict[str, Any] = {
            "prompt": fields["prompt"], "num_images": n, "seed": None if seed == -1 and type(seed) is int else seed,
            "steps": fields.get("steps"), "guidance_scale": fields.get("guidance_scale"),
            "negative_prompt": "" if fields.get("negative_prompt") is None else fields["negative_prompt"],
            "loras": loras}
        if width is not None:
            values.update(width=width, height=height)
        if fields.get("strength") is not None:
            values["strength"] = fields["strength"]
        return GenerationRequest(**values, **files)

    @router.post("/v1/images/generations")
    async def generations(request: fastapi.Request) -> Any:
        """OpenAI's image generation: a JSON body (prompt, n 1-4, size "WxH", response_format, model, and this
        server's seed, steps, guidance_scale, negative_prompt, loras)."""
        try:
            await authorize(request)
            try:
                fields = await request.json()
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise ApiError(400, _unreadable_json("the body", exc) + ": send {\"prompt\": \"...\"} with "
                                    "Content-Type application/json.") from None
            if not isinstance(fields, dict):
                raise ApiError(400, f"the body must be a JSON object; got {_shown(fields)}.")
            job_request = request_from(fields, _GENERATION_FIELDS, "/v1/images/generations")
            return await run(request, job_request, fields.get("response_format"), fields.get("model"))
        except ApiError as exc:
            _count_refusal(service, exc)
            return exc.response(replica_id)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the client still gets this API's error shape
            return _internal_error(service, exc).response(replica_id)

    @router.post("/v1/images/edits")
    async def edits(request: fastapi.Request) -> Any:
        """OpenAI's image edit (multipart): ``image`` and ``prompt``; with a ``mask`` inpainting, without one image
        to image (``strength``, default 0.6). The mask follows OpenAI's rule (transparent pixels are repainted) or,
        without transparency, this server's (white is repainted). Without ``size`` the output takes the image's
        size rounded to multiples of 16."""
        try:
            await authorize(request)
            try:
                form = await request.form(max_part_size=settings.max_upload_mb * 2**20)
            except Exception as exc:  # noqa: BLE001 - starlette raises its own parse errors; all mean "bad body"
                raise ApiError(400, f"the body could not be read as multipart/form-data ({_first_line(exc)}): send "
                                    f"the image as a file field (at most {settings.max_upload_mb} MB).") from None
            fields: dict[str, Any] = {}
            uploads: dict[str, tuple[bytes, str]] = {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # an UploadFile
                    role = "image" if key in ("image", "image[]") else key
                    if role in uploads:
                        raise ApiError(400, f"more than one {role!r} file: this server edits one image per request.",
                                       param=role)
                    uploads[role] = (await value.read(), value.filename or role)
                else:
                    fields[key] = value
            fields.update({key: None for key in uploads if key not in ("image", "mask")})
            job_request = await asyncio.to_thread(_edit_request, fields, uploads, settings, request_from)
            return await run(request, job_request, fields.get("response_format"), fields.get("model"))
        except ApiError as exc:
            _count_refusal(service, exc)
            return exc.response(replica_id)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the client still gets this API's error shape
            return _internal_error(service, exc).response(replica_id)

    @router.get("/v1/models")
    async def models(request: fastapi.Request) -> Any:
        try:
            await authorize(request)
        except ApiError as exc:
            return exc.response(replica_id)
        return answer({"object": "list", "data": [{"id": model_id(settings), "object": "model", "created": 0,
                                                   "owned_by": "zimage"}]})

    @router.get("/v1/files/{name}")
    async def files(name: str, expires: str | None = None, signature: str | None = None) -> Any:
        """A saved PNG, by the signed link a ``response_format="url"`` answer gave."""
        if closed is not None:
            return ApiError(403, closed, code="rest_api_disabled").response(replica_id)
        if not _FILE_NAME.match(name) or not signer.check(name, expires, signature):
            return ApiError(404, "No such image, or its link expired: links are valid for "
                                 f"{URL_TTL_S // 60} minutes.", code="not_found").response(replica_id)
        path = outputs / name
        if not path.is_file():
            return ApiError(404, "No such image: it may have been cleaned up.", code="not_found").response(replica_id)
        return FileResponse(path, media_type="image/png",
                            headers={"x-zimage-replica": replica_id} if replica_id else None)

    return router


def _edit_request(fields: dict, uploads: dict[str, tuple[bytes, str]], settings: Settings,
                  request_from: Any) -> GenerationRequest:
    """Read the edit's files (in a worker thread: decoding takes time) and build the request."""
    from .uploads import prepare_inputs, read_image

    if "image" not in uploads:
        raise ApiError(400, "image is required: send the image to edit as a file field named 'image'.", param="image")
    max_bytes = settings.max_upload_mb * 2**20
    for key in ("n", "steps", "seed"):  # multipart sends text: whole numbers are parsed, never rounded
        if isinstance(fields.get(key), str):
            fields[key] = _form_number(fields[key], key, whole=True)
    for key in ("strength", "guidance_scale"):
        if isinstance(fields.get(key), str):
            fields[key] = _form_number(fields[key], key, whole=False)
    if isinstance(fields.get("loras"), str) and fields["loras"].strip():  # empty: no LoRA, as in a JSON body
        try:
            fields["loras"] = json.loads(fields["loras"])
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, _unreadable_json(f"loras={_shown(fields['loras'])}", exc) + ": a form field holds it "
                                "as JSON text, e.g. [{\"name\": \"NAME\", \"weight\": 0.8}].", param="loras") from None
    try:
        source = read_image(uploads["image"][0], uploads["image"][1], max_bytes=max_bytes)
    except ValidationError as exc:
        raise ApiError(400, str(exc), param="image") from None
    width, height = parse_size(fields.get("size"))
    if width is None:
        from .uploads import nearest_valid_size

        width, height = nearest_valid_size(*source.image.size)
    fields = {**fields, "size": f"{width}x{height}"} if isinstance(width, int) else fields
    mask = uploads.get("mask")
    try:
        if mask is not None:
            mask = (_openai_mask(mask[0], mask[1], max_bytes), mask[1])
    except ValidationError as exc:
        raise ApiError(400, str(exc), param="mask") from None
    try:
        read = prepare_inputs(width, height, max_bytes=max_bytes, image=uploads["image"], mask=mask)
    except ValidationError as exc:
        raise ApiError(400, str(exc), param=openai_param(exc.param)) from None
    return request_from(fields, _EDIT_FIELDS, "/v1/images/edits", inputs=read.inputs, **read.fields)


def _openai_mask(data: bytes, name: str, max_bytes: int) -> bytes:
    """OpenAI's mask rule (fully transparent pixels are edited) turned into this server's (white is repainted); a
    mask without transparency is kept as it is (white is repainted). Returns PNG bytes."""
    import io

    from .uploads import read_image

    decoded = read_image(data, name, max_bytes=max_bytes, mode="RGBA").image
    alpha = decoded.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return data
    mask = alpha.point(lambda value: 255 if value == 0 else 0)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def _form_number(text: str, name: str, *, whole: bool) -> int | float:
    try:
        if not text.isascii():  # int() and float() take any script's digits; a form field is ASCII
            raise ValueError
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ApiError(400, f"{name}={_shown(text)} is not {kind}.", param=name) from None


def _unreadable_json(what: str, exc: BaseException) -> str:
    """Why ``what`` could not be read as JSON: invalid, nested deeper than Python's parser goes, or holding a number
    with more digits than Python converts (its int_max_str_digits limit, 4300 by default)."""
    if isinstance(exc, RecursionError):
        return f"{what} is JSON nested too deeply to read (no field of this API needs more than a few levels)"
    if "integer string conversion" in str(exc):
        return f"{what} holds a number with thousands of digits, more than can be read (no field needs one)"
    return f"{what} is not JSON"


def _internal_error(service: GenerationService, exc: Exception) -> ApiError:
    """A failure nobody foresaw (a bug): logged with its traceback, counted as failed, answered as a 500 in OpenAI's
    shape rather than the web server's plain-text page."""
    log.exception("unexpected error in the REST API")
    service.count_outcome("failed")
    return ApiError(500, f"The server failed unexpectedly ({type(exc).__name__}); it logged the details.",
                    type_="server_error", code="internal_error")


def _count_refusal(service: GenerationService, error: ApiError) -> None:
    """Refusals decided here (before the service saw the request) are counted as the service counts its own."""
    if not error.counted and error.status in (400, 401, 403):
        service.count_outcome("invalid")



__all__ = ["ApiError", "UrlSigner", "build_router", "parse_size", "rest_api_problem", "MAX_IMAGES"]

"""The web app: a Gradio Blocks UI and HTTP API over the generation service, plus /healthz and /metrics.

:func:`build_app` returns a FastAPI application with Gradio mounted at ``/``. Gradio is only the door:
every generation is a job of the service (:mod:`zimage.jobs`), which owns the queue bound, the order,
progress and cancel. The handler is an async generator: it submits the job, reports its progress by
stage through ``gr.Progress`` and yields a heartbeat while it waits, so

* a client that disconnects or is killed ends the generator (Gradio closes it after the next heartbeat)
  and its job is cancelled;
* a cancel from ``gradio_client``'s ``job.cancel()`` or the page's Cancel button, which both send
  Gradio's ``/cancel`` with their event id, is routed by :class:`JobRouting` to exactly that event's
  job (Gradio's own cancel would stop every event of the session);
* a refusal (queue full, invalid, not ready) is the service's typed error, shown as a readable message.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils  # the web door is Gradio; app.py sets GRADIO_TEMP_DIR before importing this module

from .errors import GenerationCancelled, QueueFull, ServiceNotReady, ValidationError, ZImageError
from .errors import shown as _shown
from .jobs import Job, watch
from .lora import loras_from_request
from .metrics import Metrics
from .service import (
    DEFAULT_SIDE_PX,
    MAX_IMAGES,
    MAX_SIDE_PX,
    MAX_STEPS,
    MIN_SIDE_PX,
    MAX_GUIDANCE,
    SIDE_MULTIPLE_PX,
    GenerationRequest,
    GenerationService,
)
from .settings import Settings, read_auth_pairs
from .uploads import PreparedInputs, prepare_inputs

log = logging.getLogger("zimage.web")

#: Size presets (all multiples of 16), label -> (width, height).
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "1:1 square, 1024x1024": (1024, 1024),
    "4:3 landscape, 1152x864": (1152, 864),
    "3:4 portrait, 864x1152": (864, 1152),
    "3:2 landscape, 1248x832": (1248, 832),
    "2:3 portrait, 832x1248": (832, 1248),
    "16:9 wide, 1280x720": (1280, 720),
    "9:16 tall, 720x1280": (720, 1280),
    "1:1 small and fast, 512x512": (512, 512),
}
CUSTOM_SIZE = "Custom"
EXAMPLE_PROMPTS = [
    "一只橘猫坐在洒满阳光的窗台上，柔和的晨光，写实摄影",
    "A cozy bookshop on a rainy evening, warm light through the windows, cinematic",
    "水墨画风格的山水，远处有一座小亭子，薄雾",
    "Portrait of an astronaut in a sunflower field, 35mm photo, shallow depth of field",
    "霓虹灯下的上海街头夜景，雨后的倒影，电影感",
]
#: Gradio's own cache of served files: checked every 5 minutes, files older than 30 minutes deleted.
GRADIO_CACHE_SWEEP = (300, 1800)
#: How often a waiting handler yields to Gradio when nothing changed: after each yield Gradio checks that
#: the client is still there, and closes the handler (cancelling its job) when it is gone.
HEARTBEAT_S = 0.5
#: Events Gradio's own queue may hold besides the service's queue. Generation handlers leave Gradio's queue
#: at once (they only wait on the service), so this is only a guard against a flood of joins.
GRADIO_QUEUE_SLACK = 16
#: Join records kept for routing cancels (an event whose handler never ran leaves its record behind).
MAX_TRACKED_EVENTS = 4096


class GradioEvents:
    """Maps Gradio event ids to service jobs, so a cancel reaches exactly the job of its event.

    Gradio assigns the event id when a client joins the queue; the handler later runs with the join's
    HTTP request. :class:`JobRouting` tags each join with a token the handler can read
    (``request.state``, Starlette's public per-request state) and records which event id it got.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._joins: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._event_to_join: dict[str, str] = {}

    def joined(self, join_id: str, event_id: str, session_hash: str | None) -> None:
        with self._lock:
            record = self._joins.setdefault(join_id, {"job": None, "cancelled": False})
            record.update(event_id=event_id, session_hash=session_hash)
            self._event_to_join[event_id] = join_id
            while len(self._joins) > MAX_TRACKED_EVENTS:
                _, old = self._joins.popitem(last=False)
                self._event_to_join.pop(old.get("event_id"), None)

    def attach(self, join_id: str | None, job: Job) -> None:
        """Link the handler's job to its join; a cancel that came first cancels the job now."""
        if join_id is None:
            return
        with self._lock:
            record = self._joins.setdefault(join_id, {"job": None, "cancelled": False})
            record["job"] = job
            cancelled = record["cancelled"]
        if cancelled:
            job.cancel("cancelled by the client")

    def detach(self, join_id: str | None) -> None:
        if join_id is None:
            return
        with self._lock:
            record = self._joins.pop(join_id, None)
            if record is not None:
                self._event_to_join.pop(record.get("event_id"), None)

    def cancel(self, event_id: str, session_hash: str | None) -> bool:
        """Cancel the job of ``event_id`` (only for the session that joined it). False when it is not ours."""
        with self._lock:
            join_id = self._event_to_join.get(event_id)
            record = self._joins.get(join_id) if join_id else None
            if record is None or record.get("session_hash") != session_hash:
                return False
            record["cancelled"] = True
            job = record["job"]
        if job is not None:
            job.cancel("cancelled by the client")
        return True


#: Endpoint parameters that are files (Gradio file records): anything else there is refused before Gradio parses it.
FILE_PARAMETERS = frozenset({"image", "mask", "control_image", "editor"})


class JobRouting:
    """ASGI middleware: tags queue joins with a token and routes Gradio's ``/cancel`` to the service's job.

    Only Gradio's HTTP protocol (what its JavaScript and Python clients send) is read: the join's JSON
    answer ``{"event_id": ...}`` and the cancel body ``{"event_id", "session_hash", "fn_index"}``.
    """

    def __init__(self, app: Any, events: GradioEvents, arity: dict, on_invalid: Any) -> None:
        """``arity``: the parameter names of each queued event, by fn_index (int) and by api_name (str), from
        the events' public config (and its API name under ``("name", fn_index)``); ``on_invalid(message)`` counts and logs a call with the wrong number."""
        self.app = app
        self.events = events
        self.arity = arity
        self.on_invalid = on_invalid

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        post = scope.get("method") == "POST"
        if post and path.endswith("/cancel"):
            await self._cancel(scope, receive, send)
            return
        if not (post and (path.endswith("/queue/join") or "/call/" in path or "/run/" in path or "/api/" in path)):
            await self.app(scope, receive, send)
            return
        body, receive = await _read_body(receive)
        key = path.rstrip("/").rsplit("/", 1)[-1] if "/call/" in path else _json_field(body, "fn_index")
        if await self._check_files(send, body, key):
            return
        if path.endswith("/queue/join"):
            await self._join(scope, body, receive, send)
        elif "/call/" in path and await self._check_arity(send, path.rstrip("/").rsplit("/", 1)[-1], body):
            return
        else:
            await self.app(scope, receive, send)

    async def _check_files(self, send: Any, body: bytes, key: Any) -> bool:
        """Answer 422 (and return True) when a file record in the call names anything but an uploaded file.

        Gradio copies every file record's path (or URL) into its cache before any handler runs, and for an app
        mounted with ``mount_gradio_app`` it does not check where the path points: a client could name any file
        this process can read, or make it fetch a URL. Only files uploaded to this server are let through."""
        data = _json_field(body, "data")
        names = self.arity.get(key) or ()
        message = None
        if isinstance(data, list):
            for name, value in zip(names, data):
                if name in FILE_PARAMETERS and value is not None and not isinstance(value, dict):
                    message = (f"{name}={_shown(value)} is not a file: upload the file first and send the record the "
                               "upload returned ({\"path\": ...}; gradio_client: handle_file(PATH)), or null.")
                    break
        foreign = _foreign_file(data, Path(gradio.utils.get_upload_folder()).resolve()) if data else None
        if foreign is not None:
            message = (f"the file {_shown(foreign, 80)} was not uploaded to this server: upload files first "
                       "(the page and gradio_client's handle_file do), then send the path the upload returned.")
        if message is None:
            return False
        self.on_invalid(message)
        await _send_json(send, 422, {"error": message, "detail": message})
        return True

    async def _check_arity(self, send: Any, key: Any, body: bytes) -> bool:
        """Answer 422 (and return True) when ``body`` has the wrong number of inputs for the event ``key``.

        Gradio would raise deep inside and print a traceback; this says what is expected, in one line."""
        names, data = self.arity.get(key), _json_field(body, "data")
        if names is None or not isinstance(data, list) or len(data) == len(names):
            return False
        endpoint = key if isinstance(key, str) else self.arity.get(("name", key), "this endpoint")
        message = f"/{endpoint} takes {len(names)} values ({', '.join(names)}); {len(data)} were sent."
        self.on_invalid(message)
        await _send_json(send, 422, {"error": message, "detail": message})
        return True

    async def _join(self, scope: dict, body: bytes, receive: Any, send: Any) -> None:
        join_id = secrets.token_hex(8)
        scope.setdefault("state", {})["zimage_join_id"] = join_id
        if await self._check_arity(send, _json_field(body, "fn_index"), body):
            return
        session_hash = _json_field(body, "session_hash")
        answer: list[bytes] = []

        async def watch_answer(message: dict) -> None:
            if message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
                if not message.get("more_body"):
                    event_id = _json_field(b"".join(answer), "event_id")
                    if isinstance(event_id, str):
                        self.events.joined(join_id, event_id, session_hash)
            await send(message)

        await self.app(scope, receive, watch_answer)

    async def _cancel(self, scope: dict, receive: Any, send: Any) -> None:
        # Never handed to Gradio: its cancel closes whatever generator the event id names, whoever asks, and
        # every queued event here is a service job that this router knows.
        body, _ = await _read_body(receive)
        event_id = _json_field(body, "event_id")
        cancelled = isinstance(event_id, str) and self.events.cancel(event_id, _json_field(body, "session_hash"))
        await _send_json(send, 200, {"success": bool(cancelled)})


async def _send_json(send: Any, status: int, value: dict) -> None:
    payload = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """Read a request body and return it with a ``receive`` that replays it to the next app."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _foreign_file(value: Any, upload_folder: Path, depth: int = 0) -> str | None:
    """The first file record (a dict with a ``path``) in ``value`` whose path is not inside ``upload_folder``."""
    if depth > 8:  # Gradio's values nest a few levels (an editor's layers); deeper is not a real call
        return "a value nested too deeply"
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and path:
            try:
                inside = Path(path).resolve().is_relative_to(upload_folder)
            except (OSError, ValueError):
                inside = False
            if not inside:
                return path
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = _foreign_file(item, upload_folder, depth + 1)
        if found is not None:
            return found
    return None


def _json_field(body: bytes, name: str) -> Any:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return None
    return value.get(name) if isinstance(value, dict) else None


class _BusyCounter:
    """ASGI middleware counting Gradio's own queue-full refusals (answered before any handler runs)."""

    def __init__(self, app: Any, on_busy: Any) -> None:
        self.app = app
        self.on_busy = on_busy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/queue/join"):
            await self.app(scope, receive, send)
            return

        async def watch_status(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.on_busy()
            await send(message)

        await self.app(scope, receive, watch_status)


def _seed_value(seed: Any) -> Any:
    """-1 or empty means "draw a random seed"; anything else (-5 included) goes to validation as it is."""
    if seed is None or (type(seed) is int and seed == -1):
        return None
    return seed


#: What a mode endpoint says when its input is missing.
REQUIRED_MESSAGES = {
    "image": "an input image is required: upload the image to start from.",
    "mask": "a mask is required for inpainting (white: repaint): send one, or use /img2img without a mask.",
    "control_image": "a control image is required for ControlNet: upload one (edges, depth, pose...).",
    "editor": "the image editor is empty: upload the image to repaint, then paint over the area to change.",
}


class WebGenerator:
    """The handlers of the generation endpoints over the service (one per app).

    Every handler takes the values as the client sent them (``preprocess=False``): numbers are checked by the
    service, never rounded by Gradio, and files arrive as Gradio's file records, whose path must lie in
    Gradio's upload folder (a client cannot name any other file of this machine).
    """

    def __init__(self, service: GenerationService, events: GradioEvents, settings: Settings) -> None:
        self.service = service
        self.events = events
        self.max_upload_bytes = settings.max_upload_mb * 2**20

    # --- The endpoints (their parameter names are the API's) ------------------------------------------
    async def generate(self, prompt: Any, width: Any, height: Any, steps: Any, seed: Any, num_images: Any,
                       guidance_scale: Any = 0.0, negative_prompt: Any = "", loras: Any = None,
                       request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """Text to image: yields Gradio's "no change" while the job waits and runs, then (gallery, info).

        seed -1 (or empty) draws a random seed; the used seed is in the returned info.
        """
        async for output in self._run(request, progress, {}, (), prompt=prompt, width=width, height=height,
                                      steps=steps, seed=seed, num_images=num_images, guidance_scale=guidance_scale,
                                      negative_prompt=negative_prompt, loras=loras):
            yield output

    async def img2img(self, prompt: Any, image: Any, strength: Any, width: Any, height: Any, steps: Any, seed: Any,
                      num_images: Any, guidance_scale: Any = 0.0, negative_prompt: Any = "", loras: Any = None,
                      request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """Image to image: ``image`` (PNG/JPEG/WebP, resized to width x height) repainted by ``strength`` (0, 1]."""
        async for output in self._run(request, progress, {"image": image}, ("image",), prompt=prompt,
                                      strength=strength, width=width, height=height, steps=steps, seed=seed, num_images=num_images,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt, loras=loras):
            yield output

    async def inpaint(self, prompt: Any, image: Any, mask: Any, strength: Any, width: Any, height: Any, steps: Any,
                      seed: Any, num_images: Any, guidance_scale: Any = 0.0, negative_prompt: Any = "",
                      loras: Any = None, request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """Inpainting: the white area of ``mask`` (or the painted strokes of a transparent PNG) is repainted."""
        async for output in self._run(request, progress, {"image": image, "mask": mask}, ("image", "mask"),
                                      prompt=prompt,
                                      strength=strength, width=width, height=height, steps=steps, seed=seed,
                                      num_images=num_images, guidance_scale=guidance_scale,
                                      negative_prompt=negative_prompt, loras=loras):
            yield output

    async def controlnet(self, prompt: Any, control_image: Any, controlnet_conditioning_scale: Any, width: Any,
                         height: Any, steps: Any, seed: Any, num_images: Any, image: Any = None, mask: Any = None,
                         guidance_scale: Any = 0.0, negative_prompt: Any = "", loras: Any = None,
                         request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """ControlNet: the image follows ``control_image`` (edges, depth, pose...); with ``image`` and ``mask``
        only the mask's white area is repainted."""
        async for output in self._run(request, progress, {"control_image": control_image, "image": image,
                                                          "mask": mask}, ("control_image",),
                                      prompt=prompt, controlnet_conditioning_scale=controlnet_conditioning_scale,
                                      width=width, height=height, steps=steps, seed=seed, num_images=num_images,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt, loras=loras):
            yield output

    # The page's editors: an ImageEditor value is the background image and the painted layers.
    async def inpaint_editor(self, prompt: Any, editor: Any, strength: Any, width: Any, height: Any, steps: Any,
                             seed: Any, num_images: Any, guidance_scale: Any, negative_prompt: Any, loras: Any,
                             request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        async for output in self._run(request, progress, {"editor": editor}, ("editor",), prompt=prompt,
                                      strength=strength,
                                      width=width, height=height, steps=steps, seed=seed, num_images=num_images,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt, loras=loras):
            yield output

    async def controlnet_editor(self, prompt: Any, control_image: Any, controlnet_conditioning_scale: Any,
                                editor: Any, width: Any, height: Any, steps: Any, seed: Any, num_images: Any,
                                guidance_scale: Any, negative_prompt: Any, loras: Any,
                                request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        files = {"control_image": control_image, "editor": editor if _editor_has_image(editor) else None}
        async for output in self._run(request, progress, files, ("control_image",), prompt=prompt,
                                      controlnet_conditioning_scale=controlnet_conditioning_scale, width=width,
                                      height=height, steps=steps, seed=seed, num_images=num_images,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt, loras=loras):
            yield output

    # --- One job ---------------------------------------------------------------------------------------
    async def _run(self, request: Any, progress: Any, files: dict[str, Any], required: tuple[str, ...], *,
                   seed: Any, loras: Any, negative_prompt: Any, **values: Any):
        """One job: ``files`` are the endpoint's file inputs, ``required`` those it cannot do without (an endpoint
        never falls back to another mode because an input is missing)."""
        try:
            missing = [name for name in required if files.get(name) is None]
            if missing:
                raise ValidationError(REQUIRED_MESSAGES[missing[0]])
            inputs = await asyncio.to_thread(self._read_files, files, values.get("width"), values.get("height"))
            job_request = GenerationRequest(seed=_seed_value(seed), loras=loras_from_request(loras),
                                            negative_prompt="" if negative_prompt is None else negative_prompt,
                                            inputs=inputs.inputs, **values, **inputs.fields)
        except ValidationError as exc:
            _refused_call(self.service, str(exc))
            raise _shown_error("Invalid request", str(exc)) from None
        try:
            job = self.service.submit(job_request)
        except QueueFull as exc:
            raise _shown_error("Busy", str(exc)) from None
        except ValidationError as exc:
            raise _shown_error("Invalid request", str(exc)) from None
        except ServiceNotReady as exc:
            raise _shown_error("Not ready", str(exc)) from None
        join_id = _join_id(request)
        self.events.attach(join_id, job)
        try:
            async for state in watch(job, HEARTBEAT_S):
                if progress is not None and not state.final:
                    progress(state.fraction(), desc=state.describe())
                if not state.final:
                    yield gr.skip(), gr.skip()  # a heartbeat: Gradio checks the client is still connected
        finally:
            # Closed by Gradio (client gone), cancelled, or done: a job nobody waits for must not hold the GPU.
            if not job.done:
                job.cancel("the client went away")
            self.events.detach(join_id)
        try:
            result = job.result()
        except GenerationCancelled:
            raise _shown_error("Cancelled", "The generation was cancelled.") from None
        except ZImageError as exc:
            raise _shown_error("Generation failed", str(exc)) from None
        gallery = [(str(path), f"seed {seed}") for path, seed in zip(result.paths, result.seeds)]
        info = result.info()
        info["warnings"] = list(inputs.notes) + info["warnings"]
        yield gallery, info

    def _read_files(self, files: dict[str, Any], width: Any, height: Any) -> PreparedInputs:
        """Read and check the request's images (in a worker thread: decoding takes time)."""
        if not any(value is not None for value in files.values()) or not (_is_pixels(width) and _is_pixels(height)):
            # Nothing to read, or a size the service refuses itself, with the usual message.
            return PreparedInputs(fields={}, inputs=(), notes=())
        editor = files.pop("editor", None)
        layers = None
        if editor is not None:
            if not _editor_has_image(editor):
                raise ValidationError("the image editor is empty: upload the image to repaint, then paint over "
                                      "the area to change.")
            files["image"] = editor["background"]
            layers = [self._upload(layer, "painted layer") for layer in editor.get("layers") or [] if layer]
        read = {role: self._upload(value, role) for role, value in files.items() if value is not None}
        return prepare_inputs(width, height, max_bytes=self.max_upload_bytes, mask_layers=layers, **read)

    def _upload(self, value: Any, what: str) -> tuple[bytes, str]:
        """The bytes and name of an uploaded file given as Gradio's file record (``{"path": ...}``).

        Only files in Gradio's upload folder are read: with ``preprocess=False`` Gradio passes the record as the
        client wrote it, so the path is checked here.
        """
        path = value.get("path") if isinstance(value, dict) else None
        if not isinstance(path, str) or not path:
            raise ValidationError(f"{what} must be an uploaded image file (gradio_client: handle_file(PATH)); got "
                                  f"{_shown(value)}.")
        name = value.get("orig_name") or Path(path).name
        name = name if isinstance(name, str) else Path(path).name
        folder = Path(gradio.utils.get_upload_folder()).resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(folder) or not resolved.is_file():
            raise ValidationError(f"{what} {_shown(name)} is not a file uploaded to this server: upload it first "
                                  "(gradio_client's handle_file does).")
        size_bytes = resolved.stat().st_size
        if size_bytes > self.max_upload_bytes:
            raise ValidationError(f"{name} is {size_bytes / 2**20:.1f} MB: the limit is "
                                  f"{self.max_upload_bytes / 2**20:.0f} MB (--max-upload-mb).")
        return resolved.read_bytes(), name


def _is_pixels(value: Any) -> bool:
    return type(value) is int and value > 0


def _editor_has_image(editor: Any) -> bool:
    return isinstance(editor, dict) and editor.get("background") is not None


def _join_id(request: Any) -> str | None:
    inner = getattr(request, "request", None)
    state = getattr(inner, "state", None)
    return getattr(state, "zimage_join_id", None)


def pick_size(preset: str) -> tuple[Any, Any]:
    if preset in SIZE_PRESETS:
        width, height = SIZE_PRESETS[preset]
        return gr.update(value=width, interactive=False), gr.update(value=height, interactive=False)
    return gr.update(interactive=True), gr.update(interactive=True)


def remember(gallery: list, info: dict, history: list) -> tuple[list, list, str]:
    history = (list(gallery or []) + list(history or []))[:48]
    return history, history, _status_line(info)


#: The page's modes: tab id -> (tab label, label of the API endpoint the tab's Generate button calls).
MODES = {"text": "Text to image", "img2img": "Image to image", "inpaint": "Inpainting", "controlnet": "ControlNet"}
#: LoRA rows on the page (the service accepts at most this many per request).
LORA_ROWS = 4


def job_started(*rows: Any) -> tuple[Any, str, list]:
    """Enable Cancel, clear the status and collect the LoRA rows (name, weight, name, weight...) for the job."""
    return gr.update(interactive=True), "", lora_rows_value(rows)


def lora_rows_value(rows: tuple[Any, ...]) -> list[dict]:
    """The page's LoRA rows as the API's ``loras`` value: rows without a name are skipped."""
    return [{"name": name, "weight": weight} for name, weight in zip(rows[0::2], rows[1::2]) if name]


def job_ended() -> Any:
    return gr.update(interactive=False)


def cancel_requested() -> tuple[str, Any]:
    return "**Cancelled.**", gr.update(interactive=False)


def show_mode(mode: str) -> list[Any]:
    """Only the selected tab's Generate button is shown: each calls its own endpoint."""
    return [gr.update(visible=name == mode) for name in MODES]


def size_from_image(path: Any) -> tuple[Any, Any, Any]:
    """After an upload: the size presets switch to Custom with the nearest size the model can make."""
    from PIL import Image

    from .uploads import nearest_valid_size

    if isinstance(path, dict):  # an ImageEditor value: the uploaded image is its background
        path = path.get("background")
    if not path:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        with Image.open(path) as image:
            width, height = nearest_valid_size(*image.size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return gr.skip(), gr.skip(), gr.skip()  # the job refuses the file with the full message
    return (CUSTOM_SIZE, gr.update(value=width, interactive=True), gr.update(value=height, interactive=True))


def use_as_input(gallery: list, selected: Any) -> list[Any]:
    """Send the selected result (else the first) to image-to-image, and switch to that tab."""
    if not gallery:
        return [gr.skip(), gr.skip(), *[gr.skip()] * len(MODES),
                "There is no result to use yet: generate an image first."]
    index = selected if isinstance(selected, int) and 0 <= selected < len(gallery) else 0
    item = gallery[index]
    path = item[0] if isinstance(item, (list, tuple)) else item
    return [path, gr.Tabs(selected="img2img"), *show_mode("img2img"), "The result is the input of image to image."]


def fill_from_png(path: Any, available_loras: list[str]) -> list[Any]:
    """Fill the form from the parameters saved in one of this server's PNGs (prompt, seed, size, steps, LoRAs).

    LoRAs that are not in the folder now (``available_loras``) are left out, and the status says which."""
    from .storage import read_metadata

    keep = [gr.skip()] * (8 + 2 * LORA_ROWS)
    if not path:
        return keep + [gr.skip()]
    try:
        meta = read_metadata(Path(path))
    except (OSError, ValueError, SyntaxError):
        return keep + [f"{Path(path).name} has no parameters from this server: drop a PNG generated here."]
    entries = [entry for entry in meta.get("loras") or [] if isinstance(entry, dict)]
    usable = [entry for entry in entries if entry.get("name") in available_loras][:LORA_ROWS]
    missing = [str(entry.get("name")) for entry in entries if entry not in usable]
    rows: list[Any] = []
    for index in range(LORA_ROWS):
        entry = usable[index] if index < len(usable) else {}
        # The pickers get the folder's current names too: a value outside a dropdown's choices is refused.
        rows += [gr.update(value=entry.get("name"), choices=available_loras), entry.get("weight", 1.0)]
    status = f"Settings of {Path(path).name} loaded (seed {meta.get('seed')})."
    if missing:
        status += f" Not in the LoRA folder now, left out: {', '.join(missing)}."
    return [meta.get("prompt", gr.skip()), meta.get("negative_prompt", ""), CUSTOM_SIZE,
            gr.update(value=meta["width"], interactive=True) if "width" in meta else gr.skip(),
            gr.update(value=meta["height"], interactive=True) if "height" in meta else gr.skip(),
            meta.get("steps", gr.skip()), meta.get("guidance_scale", gr.skip()), meta.get("seed", gr.skip()),
            *rows, status]


def lora_choices(service: GenerationService) -> list[str]:
    """Names of the LoRAs in the folder that fit this model, for the page's pickers."""
    return [entry.info()["name"] for entry in service.list_loras() if entry.info().get("fits")]


def build_app(settings: Settings, service: GenerationService) -> Any:
    """Build the FastAPI app: Gradio UI and API at ``/``, ``/healthz``, ``/metrics``."""
    import fastapi
    from fastapi.responses import JSONResponse, Response

    metrics = Metrics(service)
    events = GradioEvents()
    door = WebGenerator(service, events, settings)
    defaults = service.defaults
    has_controlnet = service.has_controlnet
    choices = lora_choices(service)

    with gr.Blocks(title=defaults.label, delete_cache=GRADIO_CACHE_SWEEP, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {defaults.label}\nText to image, image to image, inpainting"
                    f"{' and ControlNet' if has_controlnet else ''}; one job at a time on this server's GPU.")
        if settings.demo:
            gr.Markdown("**Demo model loaded:** a tiny model with random weights. Images are noise; the "
                        "service, queue and progress work as with the real model.", elem_id="demo-banner")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id="prompt",
                                    placeholder="Describe the image, in Chinese or English")
                negative_prompt = gr.Textbox(label="Negative prompt", value="", lines=2, max_lines=6,
                                             elem_id="negative-prompt", placeholder="What the image should not show (used when guidance > 0)",
                                             visible=defaults.guidance_scale > 0)
                gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Examples")
                with gr.Tabs(elem_id="modes") as tabs:
                    with gr.Tab(MODES["text"], id="text") as text_tab:
                        gr.Markdown("The prompt alone; set the size below.")
                    with gr.Tab(MODES["img2img"], id="img2img", elem_id="tab-img2img") as img2img_tab:
                        source_image = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                                format="png", height=320, elem_id="img2img-image")
                        img2img_strength = gr.Slider(label="Strength", minimum=0.05, maximum=1.0, step=0.05,
                                                     value=0.6, info="How much is repainted: 1 ignores the input")
                    with gr.Tab(MODES["inpaint"], id="inpaint", elem_id="tab-inpaint") as inpaint_tab:
                        editor = gr.ImageEditor(label="Upload the image, then paint over what to change",
                                                type="filepath", format="png", sources=["upload", "clipboard"],
                                                layers=False, transforms=(), height=380, elem_id="inpaint-editor",
                                                brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                               color_mode="fixed", default_size=24))
                        inpaint_strength = gr.Slider(label="Strength", minimum=0.05, maximum=1.0, step=0.05,
                                                     value=1.0, info="1 repaints the painted area from scratch")
                    with gr.Tab(MODES["controlnet"], id="controlnet", visible=has_controlnet,
                                elem_id="tab-controlnet") as controlnet_tab:
                        control_image = gr.Image(label="Control image (edges, depth, pose...)", type="filepath",
                                                 sources=["upload", "clipboard"], format="png", height=320,
                                                 elem_id="control-image")
                        control_scale = gr.Slider(label="Control strength", minimum=0.0, maximum=2.0, step=0.05,
                                                  value=0.75, info="controlnet_conditioning_scale")
                        with gr.Accordion("Repaint only part of an image (optional)", open=False):
                            control_editor = gr.ImageEditor(
                                label="Image and the area to repaint", type="filepath", format="png",
                                sources=["upload", "clipboard"], layers=False, transforms=(), height=320,
                                brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed",
                                               default_size=24))
                preset = gr.Dropdown(label="Size", choices=list(SIZE_PRESETS) + [CUSTOM_SIZE],
                                     value=next(iter(SIZE_PRESETS)))
                with gr.Row():
                    # precision=None: Gradio would round 256.5 to 256 before the service sees it.
                    width = gr.Number(label="Width", value=DEFAULT_SIDE_PX, precision=None, minimum=MIN_SIDE_PX,
                                      maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                    height = gr.Number(label="Height", value=DEFAULT_SIDE_PX, precision=None, minimum=MIN_SIDE_PX,
                                       maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=defaults.steps,
                                      info=defaults.steps_note)
                    num_images = gr.Slider(label="Images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
                guidance = gr.Slider(label="Guidance scale", minimum=0.0, maximum=MAX_GUIDANCE, step=0.1,
                                     value=defaults.guidance_scale, elem_id="guidance",
                                     info="0 for Turbo (guidance-distilled); above 0 runs CFG: twice the work")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=None, minimum=-1,
                                     maximum=2**32 - 1)
                    random_seed = gr.Button("Random seed", size="sm")
                    reuse_seed = gr.Button("Reuse last seed", size="sm")
                with gr.Accordion(f"LoRA adapters ({len(choices)} in the folder)", open=bool(choices),
                                  elem_id="loras"):
                    lora_rows: list[Any] = []
                    row_boxes: list[Any] = []
                    for index in range(LORA_ROWS):
                        with gr.Row(visible=index == 0) as box:  # the next row appears once this one is used
                            row_boxes.append(box)
                            lora_rows.append(gr.Dropdown(label=f"LoRA {index + 1}", choices=choices, value=None,
                                                         elem_id=f"lora-{index}", scale=3))
                            lora_rows.append(gr.Slider(label="Weight", minimum=-2.0, maximum=2.0, step=0.05,
                                                       value=1.0, elem_id=f"lora-weight-{index}", scale=2))
                    refresh_loras = gr.Button("Rescan the LoRA folder", size="sm")
                    loras_value = gr.JSON(value=[], visible=False, label="loras")
                with gr.Row():
                    buttons = [gr.Button("Generate", variant="primary", visible=mode == "text",
                                         elem_id="generate" if mode == "text" else f"generate-{mode}")
                               for mode in MODES]
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel", interactive=False)
                with gr.Accordion("Reuse the settings of an image made here", open=False):
                    png_drop = gr.File(label="Drop a PNG generated by this server", file_types=[".png"],
                                       type="filepath", elem_id="png-drop", height=120)
            with gr.Column(scale=3):
                result = gr.Gallery(label="Result", format="png", columns=2, height=560, elem_id="result",
                                    interactive=False)
                use_button = gr.Button("Use as input (image to image)", size="sm", elem_id="use-as-input")
                status = gr.Markdown("", elem_id="status")
                info = gr.JSON(label="Details", visible=False)
                history = gr.Gallery(label="This session", format="png", columns=6, height=200, interactive=False,
                                     elem_id="history")
        # API-only endpoints: /inpaint and /controlnet take the image and the mask as files (the page's editors
        # send a background and painted layers instead), /loras lists the LoRA folder.
        with gr.Group(visible=False):
            api_image = gr.Image(label="image", type="filepath", visible=False)
            api_mask = gr.Image(label="mask", type="filepath", visible=False)
            api_control = gr.Image(label="control_image", type="filepath", visible=False)
            api_inpaint, api_controlnet, api_loras = (gr.Button(visible=False) for _ in range(3))
            loras_listing = gr.JSON(visible=False, label="loras")
        history_state = gr.State([])
        last_info = gr.State({})
        selected = gr.State(None)

        private = {"queue": False, "api_visibility": "private"}
        preset.change(pick_size, inputs=[preset], outputs=[width, height], **private)
        guidance.change(lambda g: gr.update(visible=isinstance(g, (int, float)) and g > 0), inputs=[guidance],
                        outputs=[negative_prompt], **private)
        random_seed.click(lambda: -1, outputs=[seed], **private)
        reuse_seed.click(lambda i: (i or {}).get("seed", -1), inputs=[last_info], outputs=[seed], **private)
        for tab, mode in zip((text_tab, img2img_tab, inpaint_tab, controlnet_tab), MODES):
            tab.select(lambda mode=mode: show_mode(mode), outputs=buttons, **private)
        source_image.upload(size_from_image, inputs=[source_image], outputs=[preset, width, height], **private)
        editor.upload(size_from_image, inputs=[editor], outputs=[preset, width, height], **private)
        result.select(_selected_index, outputs=[selected], **private)
        use_button.click(use_as_input, inputs=[result, selected], outputs=[source_image, tabs, *buttons, status],
                         **private)
        png_drop.upload(lambda path: fill_from_png(path, lora_choices(service)), inputs=[png_drop],
                        outputs=[prompt, negative_prompt, preset, width, height, steps, guidance, seed, *lora_rows,
                                 status], **private)
        for index in range(LORA_ROWS - 1):
            lora_rows[2 * index].change(lambda name: gr.update(visible=True) if name else gr.skip(),
                                        inputs=[lora_rows[2 * index]], outputs=[row_boxes[index + 1]], **private)
        refresh_loras.click(lambda: [gr.update(choices=lora_choices(service)) for _ in range(LORA_ROWS)],
                            outputs=lora_rows[0::2], **private)

        common = [width, height, steps, seed, num_images, guidance, negative_prompt, loras_value]
        jobs: list[Any] = []
        handlers: list[tuple[Any, Any]] = []
        ui_events = [
            (buttons[0], door.generate, [prompt, *common], "generate", "public"),
            (buttons[1], door.img2img, [prompt, source_image, img2img_strength, *common], "img2img", "public"),
            (buttons[2], door.inpaint_editor, [prompt, editor, inpaint_strength, *common], "inpaint_editor",
             "private"),
            (buttons[3], door.controlnet_editor, [prompt, control_image, control_scale, control_editor, *common],
             "controlnet_editor", "private"),
        ]
        for button, handler, inputs, api_name, visibility in ui_events:
            started = button.click(job_started, inputs=lora_rows, outputs=[cancel_button, status, loras_value],
                                   **private)
            # No Gradio concurrency limit: the handler only waits on the service, which bounds and orders jobs.
            job = started.then(handler, inputs=inputs, outputs=[result, info], api_name=api_name,
                               api_visibility=visibility, concurrency_limit=None, preprocess=False)
            job.success(remember, inputs=[result, info, history_state], outputs=[history, history_state, status],
                        **private).then(lambda i: i, inputs=[info], outputs=[last_info], **private)
            job.then(job_ended, outputs=[cancel_button], **private)
            job.failure(job_ended, outputs=[cancel_button], **private)  # an error ends the chain before "then"
            jobs.append(job)
            handlers.append((job, handler))
        for button, handler, inputs, api_name in (
                (api_inpaint, door.inpaint, [prompt, api_image, api_mask, inpaint_strength, *common], "inpaint"),
                (api_controlnet, door.controlnet, [prompt, api_control, control_scale, *common[:5], api_image,
                                                   api_mask, *common[5:]], "controlnet")):
            job = button.click(handler, inputs=inputs, outputs=[result, info], api_name=api_name,
                               concurrency_limit=None, preprocess=False)
            jobs.append(job)
            handlers.append((job, handler))
        api_loras.click(lambda: [entry.info() for entry in service.list_loras()], outputs=[loras_listing],
                        api_name="loras", queue=False)
        # The browser sends Gradio's /cancel with the running event's id; JobRouting hands it to the service.
        cancel_button.click(None, cancels=jobs[:4])
        cancel_button.click(cancel_requested, outputs=[status, cancel_button], **private)

    blocks.queue(max_size=settings.queue_size + GRADIO_QUEUE_SLACK, default_concurrency_limit=1)

    app = fastapi.FastAPI(title="Z-Image-Turbo server", docs_url=None, redoc_url=None, openapi_url=None)
    from . import auth as zauth

    from .openai_api import build_router

    # The REST API checks its own Bearer key; without one it sits behind the sign-in like everything else.
    guard = zauth.Guard(read_auth_pairs(settings), metrics_public=settings.metrics_public,
                        open_prefixes=("/v1/",) if settings.api_key else ("/v1/files/",),  # a signed link is a credential
                        openai_prefixes=("/v1/",))
    app.include_router(build_router(service, settings, ui_auth=guard.enabled))

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # load balancers often check with HEAD
    def healthz() -> Any:
        plan = service.plan
        body = {
            "status": service.state,
            "model": service.model_label,
            "device": plan.device if plan else None,
            "profile": plan.describe() if plan else None,
            "queue_depth": service.queue_depth(),
            "busy": service.busy,
        }
        if service.state == "failed":
            body["error"] = service.load_error
        problem = service.outputs_problem() if service.state == "ready" else None
        if problem is not None:  # the model is fine but no image could be saved: not healthy
            body["status"], body["error"] = "unhealthy", problem
        # With auth on, anybody may ask: only the status, no model path or error text.
        return JSONResponse(zauth.healthz_body(body, guard), status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    def metrics_route() -> Any:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    app.add_middleware(_BusyCounter, on_busy=lambda: service.count_outcome("busy"))
    arity: dict[Any, tuple[str, ...]] = {}
    for job, handler in handlers:  # each event's public config: its id, its API name and its inputs
        names = _parameter_names(handler, len(job["inputs"]))
        arity[job["id"]] = arity[job["api_name"]] = names
        arity[("name", job["id"])] = job["api_name"]
    app.add_middleware(JobRouting, events=events, arity=arity, on_invalid=lambda message: _refused_call(service, message))
    # Sign-in for every route but /healthz, no startup-events route, security headers (zimage/auth.py).
    auth_dependency = zauth.install(app, guard)
    app = gr.mount_gradio_app(
        app, blocks, path="/", auth_dependency=auth_dependency,
        allowed_paths=[str(settings.outputs_dir.resolve())], max_file_size=f"{settings.max_upload_mb}mb", show_error=True,
        footer_links=["api"], server_name=settings.host, server_port=settings.port)
    app.state.blocks = blocks
    app.state.metrics = metrics
    return app


def _selected_index(evt: gr.SelectData) -> Any:
    return evt.index


def _parameter_names(handler: Any, count: int) -> tuple[str, ...]:
    """The API parameter names of a handler (its arguments but the request and the progress)."""
    import inspect

    if handler is None:
        return tuple(f"value {index + 1}" for index in range(count))
    names = [name for name in inspect.signature(handler).parameters if name not in ("request", "progress")]
    return tuple(names[:count])


def _shown_error(title: str, message: str) -> Exception:
    """An error the page shows until the user closes it; the server log gets the job line, not a traceback."""
    return gr.Error(message, title=title, duration=None, print_exception=False)


def _refused_call(service: GenerationService, message: str) -> None:
    service.count_outcome("invalid")
    log.warning("refused a call: %s", message)


def _status_line(info: dict) -> str:
    if not info:
        return ""
    line = (f"Seed **{info['seed']}** · {info['timings']['generate_s']:.1f} s · {info['width']}x{info['height']}"
            f" · {info['profile']}")
    notes = list(info.get("warnings", [])) + list(info.get("recoveries", []))
    return line + "".join(f"\n\n> {note}" for note in notes)

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

import collections
import json
import logging
import secrets
import threading
from typing import Any

import gradio as gr  # the web door is Gradio; app.py sets GRADIO_TEMP_DIR before importing this module

from .errors import GenerationCancelled, QueueFull, ServiceNotReady, ValidationError, ZImageError
from .jobs import Job, watch
from .metrics import Metrics
from .service import (
    DEFAULT_SIDE_PX,
    DEFAULT_STEPS,
    MAX_IMAGES,
    MAX_SIDE_PX,
    MAX_STEPS,
    MIN_SIDE_PX,
    SIDE_MULTIPLE_PX,
    GenerationRequest,
    GenerationService,
)
from .settings import Settings, read_auth_pairs

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


class JobRouting:
    """ASGI middleware: tags queue joins with a token and routes Gradio's ``/cancel`` to the service's job.

    Only Gradio's HTTP protocol (what its JavaScript and Python clients send) is read: the join's JSON
    answer ``{"event_id": ...}`` and the cancel body ``{"event_id", "session_hash", "fn_index"}``.
    """

    def __init__(self, app: Any, events: GradioEvents, arity: dict, on_invalid: Any) -> None:
        """``arity``: the number of inputs of each queued event, by fn_index (int) and by api_name (str), from
        the events' public config; ``on_invalid(message)`` counts and logs a call with the wrong number."""
        self.app = app
        self.events = events
        self.arity = arity
        self.on_invalid = on_invalid

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if scope.get("method") == "POST" and path.endswith("/queue/join"):
            await self._join(scope, receive, send)
        elif scope.get("method") == "POST" and path.endswith("/cancel"):
            await self._cancel(scope, receive, send)
        elif scope.get("method") == "POST" and "/call/" in path:
            body, receive = await _read_body(receive)
            if not await self._check_arity(send, path.rstrip("/").rsplit("/", 1)[-1], body):
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _check_arity(self, send: Any, key: Any, body: bytes) -> bool:
        """Answer 422 (and return True) when ``body`` has the wrong number of inputs for the event ``key``.

        Gradio would raise deep inside and print a traceback; this says what is expected, in one line."""
        expected, data = self.arity.get(key), _json_field(body, "data")
        if expected is None or not isinstance(data, list) or len(data) == expected:
            return False
        message = (f"/{key if isinstance(key, str) else 'generate'} takes {expected} values (prompt, width, height, "
                   f"steps, seed, num_images); {len(data)} were sent.")
        self.on_invalid(message)
        await _send_json(send, 422, {"error": message, "detail": message})
        return True

    async def _join(self, scope: dict, receive: Any, send: Any) -> None:
        join_id = secrets.token_hex(8)
        scope.setdefault("state", {})["zimage_join_id"] = join_id
        body, receive = await _read_body(receive)
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


class WebGenerator:
    """The ``/generate`` handler over the service (one per app)."""

    def __init__(self, service: GenerationService, events: GradioEvents) -> None:
        self.service = service
        self.events = events

    async def generate(self, prompt: Any, width: Any, height: Any, steps: Any, seed: Any, num_images: Any,
                       request: gr.Request = None, progress: gr.Progress = gr.Progress()):
        """Generate image(s): yields Gradio's "no change" while the job waits and runs, then (gallery, info).

        Inputs arrive unprocessed (the event has ``preprocess=False``) so the service sees the client's
        values as they are: 256.5 or ``true`` are refused, never rounded. seed -1 (or empty) draws a
        random seed; the used seed is in the returned info.
        """
        job_request = GenerationRequest(prompt=prompt, width=width, height=height, steps=steps,
                                        seed=_seed_value(seed), num_images=num_images)
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
        yield gallery, result.info()


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


def job_started() -> tuple[Any, str]:
    return gr.update(interactive=True), ""


def job_ended() -> Any:
    return gr.update(interactive=False)


def cancel_requested() -> tuple[str, Any]:
    return "**Cancelled.**", gr.update(interactive=False)


def build_app(settings: Settings, service: GenerationService) -> Any:
    """Build the FastAPI app: Gradio UI and API at ``/``, ``/healthz``, ``/metrics``."""
    import fastapi
    from fastapi.responses import JSONResponse, Response

    metrics = Metrics(service)
    events = GradioEvents()
    door = WebGenerator(service, events)

    with gr.Blocks(title="Z-Image-Turbo", delete_cache=GRADIO_CACHE_SWEEP, analytics_enabled=False) as blocks:
        gr.Markdown("## Z-Image-Turbo\nText to image, one job at a time on this server's GPU.")
        if settings.demo:
            gr.Markdown("**Demo model loaded:** a tiny model with random weights. Images are noise; the "
                        "service, queue and progress work as with the real model.", elem_id="demo-banner")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id="prompt",
                                    placeholder="Describe the image, in Chinese or English")
                gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Examples")
                preset = gr.Dropdown(label="Size", choices=list(SIZE_PRESETS) + [CUSTOM_SIZE],
                                     value=next(iter(SIZE_PRESETS)))
                with gr.Row():
                    # precision=None: Gradio would round 256.5 to 256 before the service sees it.
                    width = gr.Number(label="Width", value=DEFAULT_SIDE_PX, precision=None, minimum=MIN_SIDE_PX,
                                      maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                    height = gr.Number(label="Height", value=DEFAULT_SIDE_PX, precision=None, minimum=MIN_SIDE_PX,
                                       maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=DEFAULT_STEPS,
                                      info=f"Turbo is distilled for {DEFAULT_STEPS}")
                    num_images = gr.Slider(label="Images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
                with gr.Row():
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=None, minimum=-1,
                                     maximum=2**32 - 1)
                    random_seed = gr.Button("Random seed", size="sm")
                    reuse_seed = gr.Button("Reuse last seed", size="sm")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel", interactive=False)
            with gr.Column(scale=3):
                result = gr.Gallery(label="Result", format="png", columns=2, height=560, elem_id="result",
                                    interactive=False)
                status = gr.Markdown("", elem_id="status")
                info = gr.JSON(label="Details", visible=False)
                history = gr.Gallery(label="This session", format="png", columns=6, height=200, interactive=False,
                                     elem_id="history")
        history_state = gr.State([])
        last_info = gr.State({})

        private = {"queue": False, "api_visibility": "private"}
        preset.change(pick_size, inputs=[preset], outputs=[width, height], **private)
        random_seed.click(lambda: -1, outputs=[seed], **private)
        reuse_seed.click(lambda i: (i or {}).get("seed", -1), inputs=[last_info], outputs=[seed], **private)
        started = generate_button.click(job_started, outputs=[cancel_button, status], **private)
        # No Gradio concurrency limit: the handler only waits on the service, which bounds and orders jobs.
        job = started.then(door.generate, inputs=[prompt, width, height, steps, seed, num_images],
                           outputs=[result, info], api_name="generate", concurrency_limit=None, preprocess=False)
        job.success(remember, inputs=[result, info, history_state], outputs=[history, history_state, status],
                    **private).then(lambda i: i, inputs=[info], outputs=[last_info], **private)
        job.then(job_ended, outputs=[cancel_button], **private)
        job.failure(job_ended, outputs=[cancel_button], **private)  # an error ends the chain before "then" in the page
        # The browser sends Gradio's /cancel with this event's id; JobRouting hands it to the service.
        cancel_button.click(None, cancels=[job])
        cancel_button.click(cancel_requested, outputs=[status, cancel_button], **private)

    blocks.queue(max_size=settings.queue_size + GRADIO_QUEUE_SLACK, default_concurrency_limit=1)

    app = fastapi.FastAPI(title="Z-Image-Turbo server", docs_url=None, redoc_url=None, openapi_url=None)
    from . import auth as zauth

    guard = zauth.Guard(read_auth_pairs(settings), metrics_public=settings.metrics_public)

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
    arity = {job["id"]: len(job["inputs"]), job["api_name"]: len(job["inputs"])}  # the event's public config
    app.add_middleware(JobRouting, events=events, arity=arity, on_invalid=lambda message: _refused_call(service, message))
    # Sign-in for every route but /healthz, no startup-events route, security headers (zimage/auth.py).
    auth_dependency = zauth.install(app, guard)
    app = gr.mount_gradio_app(
        app, blocks, path="/", auth_dependency=auth_dependency,
        allowed_paths=[str(settings.outputs_dir.resolve())], max_file_size="1mb", show_error=True,
        footer_links=["api"], server_name=settings.host, server_port=settings.port)
    app.state.blocks = blocks
    app.state.metrics = metrics
    return app


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

"""The web app: a Gradio Blocks UI and HTTP API over the generation service, plus /healthz and /metrics.

:func:`build_app` returns a FastAPI application with Gradio mounted at ``/``. Every generation goes
through Gradio's queue in one concurrency group (``gpu``, two workers over the service's one-job lock),
bounded by ``queue_size`` waiting jobs; a full queue is refused with Gradio's "busy, please try again"
answer (HTTP 503).
"""

import logging
import threading
import uuid
from typing import Any

from .errors import GenerationCancelled, ServiceNotReady, ValidationError, ZImageError
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
CONCURRENCY_ID = "gpu"
#: Gradio workers for generation. The service's lock still runs one pipeline at a time; the second
#: worker lets the next job take the GPU while the previous one is saved and sent (PNG encoding,
#: Gradio's file handling), so the GPU does not sit idle between jobs.
GPU_WORKERS = 2


class _BusyCounter:
    """ASGI middleware counting queue-full refusals (Gradio answers them before our code runs)."""

    def __init__(self, app: Any, on_busy: Any) -> None:
        self.app = app
        self.on_busy = on_busy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/queue/join"):
            await self.app(scope, receive, send)
            return

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.on_busy()
            await send(message)

        await self.app(scope, receive, watch)


def _as_int(value: Any) -> Any:
    """Gradio numbers may arrive as floats (512.0); whole floats become ints, the rest is validated."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _session_gone(blocks: Any, session_hash: str | None) -> bool:
    """True when Gradio marked this session's running job dead (the client disconnected).

    Gradio stops waiting for a disconnected client but keeps running its function; this lets the
    service stop the pipeline at the next step instead of holding the GPU for nothing.
    """
    queue = getattr(blocks, "_queue", None)
    for job_set in getattr(queue, "active_jobs", None) or []:
        for event in job_set or []:
            if getattr(event, "session_hash", None) == session_hash and not getattr(event, "alive", True):
                return True
    return False


def queue_depth(blocks: Any) -> int:
    """Jobs waiting in Gradio's queue plus those running."""
    queue = getattr(blocks, "_queue", None)
    if queue is None:
        return 0
    try:
        return len(queue) + queue.get_active_worker_count()
    except Exception:  # noqa: BLE001 - a metric must never break a scrape
        return 0


def build_app(settings: Settings, service: GenerationService) -> Any:
    """Build the FastAPI app: Gradio UI and API at ``/``, ``/healthz``, ``/metrics``."""
    import fastapi
    import gradio as gr
    from fastapi.responses import JSONResponse, Response

    blocks_holder: dict[str, Any] = {}
    metrics = Metrics(service, queue_depth=lambda: queue_depth(blocks_holder.get("blocks")))
    cancel_events: dict[str, threading.Event] = {}
    cancel_lock = threading.Lock()

    def generate(prompt: str, width: float, height: float, steps: float, seed: float, num_images: float,
                 request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple[list, dict]:
        """Generate image(s). seed -1 (or empty) draws a random seed; the used seed is in the returned info."""
        session = getattr(request, "session_hash", None) or uuid.uuid4().hex
        cancel = threading.Event()
        with cancel_lock:
            cancel_events[session] = cancel
        blocks = blocks_holder["blocks"]

        def on_progress(step: int, total: int) -> None:
            progress((step, total), desc=f"Denoising step {step}/{total}")
            if _session_gone(blocks, session):
                cancel.set()

        seed_value = _as_int(seed)
        job = GenerationRequest(
            prompt=prompt if isinstance(prompt, str) else "",
            width=_as_int(width), height=_as_int(height), steps=_as_int(steps),
            seed=None if seed_value is None or (isinstance(seed_value, int) and seed_value < 0) else seed_value,
            num_images=_as_int(num_images),
        )
        request_id = uuid.uuid4().hex[:12]
        progress(0, desc="Waiting for the GPU")
        try:
            result = service.generate(job, on_progress=on_progress, cancel=cancel, request_id=request_id)
        except ValidationError as exc:
            metrics.requests.labels("invalid").inc()
            raise _shown_error(gr, "Invalid request", str(exc)) from None
        except GenerationCancelled:
            metrics.requests.labels("cancelled").inc()
            raise _shown_error(gr, "Cancelled", "The generation was cancelled.") from None
        except ServiceNotReady as exc:
            metrics.requests.labels("not_ready").inc()
            raise _shown_error(gr, "Not ready", str(exc)) from None
        except ZImageError as exc:
            metrics.requests.labels("failed").inc()
            raise _shown_error(gr, "Generation failed", str(exc)) from None
        except Exception:
            metrics.requests.labels("failed").inc()
            log.exception("request %s failed", request_id)
            raise _shown_error(gr, "Generation failed",
                               f"Internal error (request {request_id}): the server log has the details.") from None
        finally:
            with cancel_lock:
                if cancel_events.get(session) is cancel:
                    del cancel_events[session]
        metrics.requests.labels("ok").inc()
        metrics.generation_seconds.observe(result.timings["generate_s"])
        _record_gpu_peak(metrics, result.plan.device)
        gallery = [(str(path), f"seed {seed}") for path, seed in zip(result.paths, result.seeds)]
        return gallery, result.info()

    def cancel_job(request: gr.Request) -> None:
        with cancel_lock:
            event = cancel_events.get(getattr(request, "session_hash", None) or "")
        if event is not None:
            event.set()

    def remember(gallery: list, info: dict, history: list) -> tuple[list, list, str]:
        history = (list(gallery or []) + list(history or []))[:48]
        return history, history, _status_line(info)

    def pick_size(preset: str) -> tuple[Any, Any]:
        if preset in SIZE_PRESETS:
            width, height = SIZE_PRESETS[preset]
            return gr.update(value=width, interactive=False), gr.update(value=height, interactive=False)
        return gr.update(interactive=True), gr.update(interactive=True)

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
                    width = gr.Number(label="Width", value=DEFAULT_SIDE_PX, precision=0, minimum=MIN_SIDE_PX,
                                      maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                    height = gr.Number(label="Height", value=DEFAULT_SIDE_PX, precision=0, minimum=MIN_SIDE_PX,
                                       maximum=MAX_SIDE_PX, step=SIDE_MULTIPLE_PX, interactive=False)
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=MAX_STEPS, step=1, value=DEFAULT_STEPS,
                                      info=f"Turbo is distilled for {DEFAULT_STEPS}")
                    num_images = gr.Slider(label="Images", minimum=1, maximum=MAX_IMAGES, step=1, value=1)
                with gr.Row():
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1,
                                     maximum=2**32 - 1)
                    random_seed = gr.Button("Random seed", size="sm")
                    reuse_seed = gr.Button("Reuse last seed", size="sm")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=3):
                result = gr.Gallery(label="Result", format="png", columns=2, height=560, elem_id="result",
                                    interactive=False)
                status = gr.Markdown("", elem_id="status")
                info = gr.JSON(label="Details", visible=False)
                history = gr.Gallery(label="This session", format="png", columns=6, height=200, interactive=False,
                                     elem_id="history")
        history_state = gr.State([])
        last_info = gr.State({})

        preset.change(pick_size, inputs=[preset], outputs=[width, height], queue=False, api_visibility="private")
        random_seed.click(lambda: -1, outputs=[seed], queue=False, api_visibility="private")
        reuse_seed.click(lambda i: (i or {}).get("seed", -1), inputs=[last_info], outputs=[seed], queue=False,
                         api_visibility="private")
        job = generate_button.click(
            generate, inputs=[prompt, width, height, steps, seed, num_images], outputs=[result, info],
            api_name="generate", concurrency_id=CONCURRENCY_ID, concurrency_limit=GPU_WORKERS)
        job.success(remember, inputs=[result, info, history_state], outputs=[history, history_state, status],
                    queue=False, api_visibility="private").then(
            lambda i: i, inputs=[info], outputs=[last_info], queue=False, api_visibility="private")
        cancel_button.click(cancel_job, cancels=[job], queue=False, api_visibility="private")

    blocks.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    blocks_holder["blocks"] = blocks

    app = fastapi.FastAPI(title="Z-Image-Turbo server", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Any:
        plan = service.plan
        body = {
            "status": service.state,
            "model": service.model_label,
            "device": plan.device if plan else None,
            "profile": plan.describe() if plan else None,
            "queue_depth": queue_depth(blocks),
            "busy": service.busy,
        }
        if service.state == "failed":
            body["error"] = service.load_error
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics")
    def metrics_route() -> Any:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    app.add_middleware(_BusyCounter, on_busy=lambda: metrics.requests.labels("busy").inc())
    auth = read_auth_pairs(settings) or None
    app = gr.mount_gradio_app(
        app, blocks, path="/", auth=auth, auth_message="Z-Image-Turbo: sign in" if auth else None,
        allowed_paths=[str(settings.outputs_dir.resolve())], max_file_size="1mb", show_error=True,
        footer_links=["api"], server_name=settings.host, server_port=settings.port)
    app.state.blocks = blocks
    app.state.metrics = metrics
    return app


def _shown_error(gr: Any, title: str, message: str) -> Exception:
    """An error the page shows until the user closes it; the server log gets the job line, not a traceback."""
    return gr.Error(message, title=title, duration=None, print_exception=False)


def _record_gpu_peak(metrics: Metrics, device: str) -> None:
    from .hardware import gpu_memory_stats, reset_gpu_peak

    stats = gpu_memory_stats(device)
    if stats:
        metrics.gpu_peak_bytes.set(stats["peak_allocated_bytes"])
        metrics.gpu_allocated_bytes.set(stats["allocated_bytes"])
        reset_gpu_peak(device)


def _status_line(info: dict) -> str:
    if not info:
        return ""
    line = (f"Seed **{info['seed']}** · {info['timings']['generate_s']:.1f} s · {info['width']}x{info['height']}"
            f" · {info['profile']}")
    notes = list(info.get("warnings", [])) + list(info.get("recoveries", []))
    return line + "".join(f"\n\n> {note}" for note in notes)

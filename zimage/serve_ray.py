"""Scale out over Ray Serve: one :class:`~zimage.service.GenerationService` per replica, behind Ray's HTTP proxy.

Each replica of the deployment owns one service (the model is loaded once, in the replica's constructor) and serves
the OpenAI-compatible REST API of :mod:`zimage.openai_api` through a FastAPI ingress, with ``/healthz`` beside it.
Ray does everything between the client and a replica: it routes each request to a replica with room, keeps the
replica count (fixed, or autoscaled on ongoing requests), queues and refuses when all replicas are full, checks the
replicas' health and replaces the ones that fail or die. This module writes no balancer, router or registry of its own.

Back-pressure, from the client's side (the README's "Scaling out with Ray Serve" has the measured behaviour):

- a replica takes at most ``max_ongoing_requests`` requests at a time (every request counts: generations, file
  downloads, ``/v1/models``, ``/healthz``); Ray's proxy holds at most ``max_queued_requests`` more waiting for a
  replica with room, and answers any request beyond that at once with ``backpressure_status`` (429 by default, or
  503) and ``Retry-After: retry_after_s``, with Ray's plain-text body ``Request dropped due to backpressure
  (num_queued_requests=Q, max_queued_requests=Q).`` (Ray's ``BackpressureConfig``);
- inside a replica the service's own queue (``--queue-size``) is a second bound: a generation beyond it gets the
  REST API's 429 with ``Retry-After`` and OpenAI's error JSON. With ``queue_size + 1 >= max_ongoing_requests`` (the
  defaults) Ray's bound always comes first;
- a request in flight on a replica that dies gets Ray's 500 (plain text); a deployment that failed to deploy gets
  Ray's 503 without ``Retry-After``.

Ray is an optional dependency (``requirements-ray.txt``). This module imports it only inside the functions that
need it, so that ``python -m zimage serve-ray --help``, the option checks and the replica's logic work without it;
the single-machine app (``app.py``, :mod:`zimage.web`, :mod:`zimage.service`) never imports this module.

Entry points: ``python -m zimage serve-ray`` (:func:`serve_main`: a local Ray instance, or ``--address`` of a
running cluster) and ``serve deploy deploy/ray/serve.yaml`` (:func:`app_builder`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ZImageError
from .jobs import RETRY_AFTER_S_PER_JOB
from .settings import Settings, SettingsError, add_settings_arguments, settings_from_args

log = logging.getLogger("zimage.serve_ray")

#: The Serve application and deployment names (``serve status``, Ray's logs and actor names show them).
APP_NAME = "zimage"
DEPLOYMENT_NAME = "ZImageServer"
#: Settings that mean nothing behind Ray: the sign-in of the Gradio page (the REST API has ``--api-key``).
NOT_FOR_RAY = ("auth", "auth_file", "metrics_public")
#: How often Ray calls a replica's ``check_health`` (seconds), and how long one call may take (seconds).
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
#: How often a replica whose constructor raised (the model did not load) is tried again before the deployment
#: is marked failed. A model that does not load rarely loads on the next try; a busy GPU sometimes does.
MAX_CONSTRUCTOR_RETRIES = 2
#: The object store of a local Ray instance (MiB): requests and answers pass through it only when larger than
#: Ray's inline limit (100 KiB); Ray's minimum is 75 MiB.
DEFAULT_OBJECT_STORE_MB = 150
MIN_OBJECT_STORE_MB = 75
BACKPRESSURE_STATUSES = (429, 503)
#: Length of the key that signs image links (bytes).
URL_KEY_BYTES = 32
#: How often ``serve.start`` is tried: Ray gives its HTTP proxy a few seconds to be ready, which a machine short of
#: CPU (tried: 2 busy loops on 2 cores) can miss; Ray then starts a new proxy.
SERVE_START_ATTEMPTS = 3
#: Exit statuses of :func:`serve_main`.
EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2


class RayOptionsError(SettingsError):
    """A Ray option has a value we cannot use; the message names the value, the flag and the fix."""


@dataclass(frozen=True)
class RayOptions:
    """How the deployment runs on Ray. Each field is a ``serve-ray`` flag (``--max-ongoing-requests``) and a key of
    ``args`` in ``deploy/ray/serve.yaml``; :meth:`validate` checks them (raises :class:`RayOptionsError`)."""

    #: Fixed number of replicas (None: 1); refused together with ``min_replicas``/``max_replicas`` (autoscaling),
    #: which decide the count themselves: a count given and then ignored would mislead whoever reads the config.
    replicas: int | None = None
    #: Autoscaling on ongoing requests: between these replica counts, aiming at ``target_ongoing_requests`` each.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    #: Requests one replica takes at a time (Ray's ``max_ongoing_requests``; every request counts).
    max_ongoing_requests: int = 4
    #: Requests Ray's proxy holds waiting for a replica with room; beyond that it refuses (``-1``: no bound).
    max_queued_requests: int = 16
    #: What a refused request gets: this HTTP status and ``Retry-After`` in whole seconds.
    backpressure_status: int = 429
    retry_after_s: int = RETRY_AFTER_S_PER_JOB
    #: Ray resources each replica reserves: CPUs (PyTorch uses ``floor(replica_cpus)`` threads, at least 1) and
    #: GPUs (``None``: 1 when the Ray cluster has a GPU, else 0).
    replica_cpus: float = 1.0
    replica_gpus: float | None = None

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def fixed_replicas(self) -> int:
        """The replica count without autoscaling: ``replicas``, 1 when left out."""
        return 1 if self.replicas is None else self.replicas

    def validate(self) -> "RayOptions":
        """Return self when every value is usable; raise :class:`RayOptionsError` naming the first that is not."""
        def whole(name: str, value: Any, low: int, high: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise RayOptionsError(f"{name}={value!r} is out of range: use a whole number from {low} to {high} "
                                      f"(--{name.replace('_', '-')}).")

        def number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high and (
                value > low if low_open else value >= low)
            if not ok:
                bound = f"more than {low:g}" if low_open else f"{low:g}"
                raise RayOptionsError(f"{name}={value!r} is out of range: use {bound} to {high:g} "
                                      f"(--{name.replace('_', '-')}).")

        if self.autoscaling and self.replicas is not None:
            raise RayOptionsError(f"replicas={self.replicas!r} is a fixed count, and --min-replicas/--max-replicas "
                                  "turn on autoscaling, which sets the count itself: leave --replicas (the "
                                  "`replicas` key) out, or drop --min-replicas and --max-replicas for a fixed count.")
        whole("replicas", self.fixed_replicas, 1, 1000)
        if self.autoscaling:
            if self.min_replicas is None or self.max_replicas is None:
                raise RayOptionsError("autoscaling needs both --min-replicas and --max-replicas (e.g. 1 and 4); "
                                      "for a fixed count use --replicas alone.")
            whole("min_replicas", self.min_replicas, 0, 1000)
            whole("max_replicas", self.max_replicas, 1, 1000)
            if self.min_replicas > self.max_replicas:
                raise RayOptionsError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}: "
                                      "swap them.")
            number("target_ongoing_requests", self.target_ongoing_requests, 0, 1000, low_open=True)
        whole("max_ongoing_requests", self.max_ongoing_requests, 1, 1000)
        if self.max_queued_requests != -1:
            whole("max_queued_requests", self.max_queued_requests, 1, 100_000)
        if self.backpressure_status not in BACKPRESSURE_STATUSES:
            raise RayOptionsError(f"backpressure_status={self.backpressure_status!r} is not valid: use 429 or 503 "
                                  "(--backpressure-status; Ray allows only these two).")
        whole("retry_after_s", self.retry_after_s, 0, 3600)
        number("replica_cpus", self.replica_cpus, 0, 1024, low_open=True)
        if self.replica_gpus is not None:
            number("replica_gpus", self.replica_gpus, 0, 64)
        return self

    def deployment_options(self, settings: Settings, *, gpus_in_cluster: float = 0.0) -> dict[str, Any]:
        """The keyword arguments of Ray's ``Deployment.options()`` for these options. ``gpus_in_cluster`` (GPUs Ray
        sees) decides ``replica_gpus=None``: one GPU per replica when there is one."""
        gpus = self.replica_gpus if self.replica_gpus is not None else (1.0 if gpus_in_cluster >= 1 else 0.0)
        actor: dict[str, Any] = {"num_cpus": self.replica_cpus}
        if gpus:
            actor["num_gpus"] = gpus
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": self.backpressure_status, "retry_after_s": self.retry_after_s},
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
            # A replica being stopped finishes its requests first, as app.py does on SIGTERM.
            "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
            "max_constructor_retry_count": MAX_CONSTRUCTOR_RETRIES,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.fixed_replicas
        return options

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``2 replicas, at most 4 requests per replica and 16 queued in Ray's
        proxy, then 429 with Retry-After 5 s``."""
        count = (f"{self.min_replicas}-{self.max_replicas} replicas (autoscaled, {self.target_ongoing_requests:g} "
                 "ongoing requests each)" if self.autoscaling else
                 f"{self.fixed_replicas} replica{'s' if self.fixed_replicas != 1 else ''}")
        if self.max_queued_requests == -1:
            return f"{count}, at most {self.max_ongoing_requests} requests per replica, no bound on Ray's queue"
        return (f"{count}, at most {self.max_ongoing_requests} requests per replica and {self.max_queued_requests} "
                f"queued in Ray's proxy, then {self.backpressure_status} with Retry-After {self.retry_after_s} s")


# --- Settings for Ray: paths every replica sees alike -----------------------------------------------------------

def settings_for_replicas(settings: Settings) -> Settings:
    """``settings`` with every path (outputs, data and LoRA folders, ...) made absolute: replicas run in other
    processes (on a cluster, other machines), and a URL answer's file must be in the one folder every replica serves
    files from."""
    changes = {f.name: value.expanduser().absolute() for f in dataclasses.fields(settings)
               if isinstance(value := getattr(settings, f.name), Path)}
    return dataclasses.replace(settings, **changes)


def settings_names() -> tuple[str, ...]:
    """The :class:`Settings` fields ``serve-ray`` and ``serve.yaml`` take (all but the Gradio page's sign-in)."""
    return tuple(f.name for f in dataclasses.fields(Settings) if f.name not in NOT_FOR_RAY)


def options_from_mapping(args: Mapping[str, Any], environ: Mapping[str, str] | None = None
                         ) -> tuple[Settings, RayOptions]:
    """Settings and Ray options from ``serve.yaml``'s ``args`` (keys: :class:`Settings` fields and
    :class:`RayOptions` fields), the rest of the settings from ``ZIMAGE_*`` variables and the defaults.

    Values are YAML's: true/false, numbers, text; ``memory_options`` may be a list. Raises :class:`SettingsError`
    naming an unknown key (and the known ones) or a bad value.
    """
    ray_names = {f.name for f in dataclasses.fields(RayOptions)}
    known = set(settings_names()) | ray_names
    unknown = sorted(set(args) - known)
    if unknown:
        raise SettingsError(f"serve.yaml args has unknown key(s) {', '.join(unknown)}: use {', '.join(sorted(known))}.")
    namespace = argparse.Namespace()
    for name in settings_names():
        if name not in args or args[name] is None:
            continue
        value = args[name]
        if isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        setattr(namespace, name, value if isinstance(value, bool) else str(value))
    settings = settings_from_args(namespace, environ)
    options = RayOptions(**{name: args[name] for name in ray_names if name in args}).validate()
    return settings, options


# --- The replica ---------------------------------------------------------------------------------------------------

def health_problem(state: str, load_error: str | None) -> str | None:
    """Why Ray should replace a replica whose service is in ``state``, or None. A failed service (it lost its model
    or its GPU, see ``GenerationService._fatal``) never recovers in place, so the replica must go; ``stopping`` is
    the replica's own shutdown. An unusable outputs folder is not a reason: a new replica would share the folder
    (``/healthz`` reports it instead)."""
    if state in ("ready", "stopping"):
        return None
    if state == "failed":
        return f"the generation service failed: {load_error or 'no cause recorded'}"
    return f"the generation service is not ready (state {state!r}) after the replica was constructed"


def health_body(service: Any, settings: Settings, replica_id: str) -> tuple[int, dict[str, Any]]:
    """``/healthz`` of one replica: (HTTP status, JSON body), as the single-machine app's ``/healthz``. 200 when
    ready; 503 while stopping, after a failure or when the outputs folder cannot take images. With an API key set
    only the status and the replica (no model path or error text), since the route is open to load balancers."""
    plan = service.plan
    body: dict[str, Any] = {"status": service.state, "replica": replica_id, "model": service.model_label,
                            "device": plan.device if plan else None, "profile": plan.describe() if plan else None,
                            "queue_depth": service.queue_depth(), "busy": service.busy}
    if service.state == "failed":
        body["error"] = service.load_error
    problem = service.outputs_problem() if service.state == "ready" else None
    if problem is not None:
        body["status"], body["error"] = "unhealthy", problem
    if settings.api_key:
        body = {"status": body["status"], "replica": replica_id}
    return (200 if body["status"] == "ready" else 503), body


class ZImageReplica:
    """What one Ray Serve replica runs: the loaded service and its REST API. Plain Python: :func:`deployment`
    wraps it with Ray's decorators, and tests construct it directly (``replica_id`` given, no Ray needed).

    ``url_key`` (bytes) signs the image links of ``response_format="url"``: one key for every replica, so that a
    link one replica gave is served by any (the images are in the one shared outputs folder); None: the key derived
    from ``settings.api_key``, the same in every replica too.

    The constructor loads the model (raises the service's :class:`ZImageError` when it cannot: Ray then retries
    the replica, :data:`MAX_CONSTRUCTOR_RETRIES` times). Ray calls ``__serve_build_asgi_app__`` once after it
    (the app), ``check_health`` every :data:`HEALTH_CHECK_PERIOD_S` seconds, and ``__del__`` when it stops the
    replica, after the replica's requests ended (or ``graceful_shutdown_timeout_s`` passed).
    """

    def __init__(self, settings: Settings, url_key: bytes | None, replica_id: str | None = None) -> None:
        import os

        from .hardware import configure_cuda_allocator
        from .logs import configure_logging
        from .service import GenerationService

        configure_logging()
        configure_cuda_allocator(os.environ)  # a replica is its own process: before its first CUDA allocation
        if replica_id is None:
            from ray import serve

            replica_id = serve.get_replica_context().replica_tag
        self.replica_id = replica_id
        self.settings = settings
        self.url_key = url_key
        self.service = GenerationService(settings)
        self.service.load()
        log.info("replica %s ready: %s, %d torch thread(s)", replica_id, self.service.plan.describe(),
                 _torch_threads())

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's FastAPI app (:func:`build_asgi_app`); Ray calls it once, after the constructor."""
        return build_asgi_app(self.service, self.settings, self.replica_id, self.url_key)

    def check_health(self) -> None:
        """Ray's health check: raise (RuntimeError naming the cause) when the service cannot serve any more, so Ray
        replaces this replica."""
        problem = health_problem(self.service.state, self.service.load_error)
        if problem is not None:
            raise RuntimeError(f"replica {self.replica_id}: {problem}")

    def close(self) -> None:
        """Stop the service: refuse new jobs, cancel what is left, let the GPU worker leave torch. Idempotent."""
        service = getattr(self, "service", None)
        if service is not None:
            self.service = None
            service.close()

    def __del__(self) -> None:
        self.close()


def build_asgi_app(service: Any, settings: Settings, replica_id: str, url_key: bytes | None) -> Any:
    """A replica's FastAPI app over ``service``: the REST API of :func:`zimage.openai_api.build_router` (answers
    name ``replica_id``; image links signed with ``url_key``) and ``/healthz`` (:func:`health_body`)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from .openai_api import build_router

    app = FastAPI(title="Z-Image-Turbo", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_router(service, settings, replica_id=replica_id, url_key=url_key))

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # load balancers often check with HEAD
    def healthz() -> Any:
        status, body = health_body(service, settings, replica_id)
        return JSONResponse(body, status_code=status, headers={"X-Zimage-Replica": replica_id})

    return app


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


_DEPLOYMENT: Any = None


def deployment() -> Any:
    """The Ray Serve deployment of :class:`ZImageReplica` (built once per process; imports Ray)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is None:
        from ray import serve

        _DEPLOYMENT = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(ZImageReplica))
    return _DEPLOYMENT


def build_application(settings: Settings, options: RayOptions, *, gpus_in_cluster: float = 0.0) -> Any:
    """The Serve application: the deployment with ``options`` applied, bound to ``settings`` (made absolute) and the
    key for image links its replicas share: derived from the API key when there is one (links then outlive a
    restart), else a new random one."""
    options.validate()
    url_key = None if settings.api_key else secrets.token_bytes(URL_KEY_BYTES)
    return deployment().options(**options.deployment_options(settings, gpus_in_cluster=gpus_in_cluster)).bind(
        settings_for_replicas(settings), url_key)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for ``serve deploy deploy/ray/serve.yaml`` and ``serve run`` (``import_path:
    zimage.serve_ray:app_builder``). ``args``: see :func:`options_from_mapping`. ``replica_gpus`` left out means
    one GPU per replica when the cluster has GPUs. Raises :class:`SettingsError` for a bad key or value, and for a
    REST API that would refuse everything (beyond loopback without ``api_key``)."""
    import ray

    from .openai_api import rest_api_problem

    settings, options = options_from_mapping(args or {})
    problem = rest_api_problem(settings, ui_auth=False) or device_problem(settings)
    if problem:
        raise SettingsError(problem)
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    return build_application(settings, options, gpus_in_cluster=gpus)


# --- python -m zimage serve-ray ----------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-ray`` subcommand (its Ray flags and the engine and server settings) to ``subparsers``."""
    defaults = RayOptions()
    parser = subparsers.add_parser(
        "serve-ray", help="Serve the REST API from several replicas on Ray Serve (needs requirements-ray.txt).",
        description="Start a local Ray instance (or join --address), deploy --replicas replicas of the REST API "
                    "(/v1/images/generations, /v1/images/edits, /v1/models, /v1/files) with Ray Serve, and serve "
                    "HTTP on --host/--port until Ctrl-C or SIGTERM, then shut Ray down.")
    ray_group = parser.add_argument_group("Ray Serve")
    ray_group.add_argument("--replicas", type=int, default=defaults.replicas, metavar="N",
                           help="Fixed number of replicas, each with its own model (default 1; not with "
                                "--min-replicas/--max-replicas).")
    ray_group.add_argument("--min-replicas", type=int, default=None, metavar="N",
                           help="Autoscale on ongoing requests, from N replicas (with --max-replicas).")
    ray_group.add_argument("--max-replicas", type=int, default=None, metavar="N", help="Autoscale up to N replicas.")
    ray_group.add_argument("--target-ongoing-requests", type=float, default=defaults.target_ongoing_requests,
                           metavar="R", help="Autoscaling aims at R ongoing requests per replica (default 2).")
    ray_group.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests, metavar="N",
                           help="Requests one replica takes at a time, every route counted (default 4).")
    ray_group.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests, metavar="N",
                           help="Requests Ray's proxy holds for a replica with room; beyond it answers "
                                "--backpressure-status with Retry-After (default 16; -1: no bound).")
    ray_group.add_argument("--backpressure-status", type=int, default=defaults.backpressure_status,
                           choices=BACKPRESSURE_STATUSES, help="Status of a refused request (default 429).")
    ray_group.add_argument("--retry-after-s", type=int, default=defaults.retry_after_s, metavar="S",
                           help=f"Retry-After of a refused request, seconds (default {defaults.retry_after_s}).")
    ray_group.add_argument("--replica-cpus", type=float, default=defaults.replica_cpus, metavar="C",
                           help="CPUs each replica reserves; PyTorch runs floor(C) threads, at least 1 (default 1).")
    ray_group.add_argument("--replica-gpus", type=float, default=None, metavar="G",
                           help="GPUs each replica reserves (default: 1 when Ray sees a GPU, else 0).")
    ray_group.add_argument("--address", default="", metavar="ADDR",
                           help="Deploy onto a running Ray cluster (ray start --head; 'auto' finds it) instead of "
                                "starting a local one; on exit the application is deleted, the cluster keeps running.")
    ray_group.add_argument("--object-store-mb", type=int, default=DEFAULT_OBJECT_STORE_MB, metavar="MB",
                           help=f"Object store of the local Ray instance (default {DEFAULT_OBJECT_STORE_MB} MiB).")
    add_settings_arguments(parser, settings_names())
    return parser


def options_from_args(args: argparse.Namespace) -> RayOptions:
    """The :class:`RayOptions` of parsed ``serve-ray`` flags, validated (raises :class:`RayOptionsError`)."""
    return RayOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests,
                      max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                      backpressure_status=args.backpressure_status, retry_after_s=args.retry_after_s,
                      replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus).validate()


class _Stop(BaseException):
    """Raised in the main thread by the first SIGTERM/SIGINT: shut down (BaseException, so that no ``except
    Exception`` inside Ray's calls swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def preflight(settings: Settings) -> str | None:
    """Checks before a local Ray instance starts (seconds saved on each mistake): those of ``app.py``
    (:func:`zimage.preflight.preflight`: the port, the outputs folder, device, dtype, memory profile, attention
    kernel), then that the model can be found (the demo model is built here once, not by every replica). Returns
    the first problem as one line, or None. Never raises for these problems."""
    from .loader import resolve_model_source
    from .preflight import preflight as common_preflight

    problem = common_preflight(settings)
    if problem:
        return problem
    try:
        resolve_model_source(settings)
    except ZImageError as exc:
        return str(exc)
    return None


def device_problem(settings: Settings) -> str | None:
    """A replica sees only the GPU(s) Ray gives it, numbered from 0: ``--device cuda:N`` with N > 0 would name a GPU
    it does not have. Returns that problem as one line, or None."""
    if settings.device.startswith("cuda:") and settings.device != "cuda:0":
        return (f"device={settings.device!r}: each replica sees only the GPU Ray gives it, as cuda:0; use --device "
                "auto or cuda (Ray picks the GPU of each replica).")
    return None


def _required_resources(options: RayOptions, deployment_options: Mapping[str, Any]) -> dict[str, float]:
    replicas = options.min_replicas if options.autoscaling else options.fixed_replicas
    actor = deployment_options["ray_actor_options"]
    return {"CPU": replicas * actor["num_cpus"], "GPU": replicas * actor.get("num_gpus", 0.0)}


def serve_main(args: argparse.Namespace) -> int:
    """``python -m zimage serve-ray``: start Ray (or join ``--address``), deploy, serve until SIGTERM/SIGINT, then
    shut down. Returns the exit status: 0 stopped, 1 the deployment failed (e.g. the model did not load in its
    replicas), 2 a bad setting or a failed start-up check. A second signal during the shutdown exits at once with
    128 + its number."""
    try:
        settings = settings_for_replicas(settings_from_args(args))
        options = options_from_args(args)
        if not MIN_OBJECT_STORE_MB <= args.object_store_mb <= 1024 * 1024:
            raise RayOptionsError(f"object_store_mb={args.object_store_mb} is out of range: use "
                                  f"{MIN_OBJECT_STORE_MB} to 1048576 MiB (--object-store-mb; Ray's minimum is 75).")
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    from .openai_api import rest_api_problem

    # Beyond loopback without a key the REST API would answer only 403.
    problem = rest_api_problem(settings, ui_auth=False) or device_problem(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        print(f"error: Ray Serve is not installed ({exc}): install it with `.venv/bin/python -m pip install -r "
              "requirements-ray.txt` (or scripts/install.sh --ray).", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    from .logs import configure_logging

    configure_logging()
    from .preflight import port_problem

    problem = port_problem(settings.host, settings.port) if args.address else preflight(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_SETTINGS

    stops: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if stops:  # a second signal, or one during the shutdown: do not wait for the replicas
            print(f"second signal {signum}: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        stops.append(signum)
        raise _Stop(signum)

    root = str(Path(__file__).resolve().parents[1])  # the repository: replicas import zimage from it
    started = False
    try:
        try:
            if args.address:
                # On a cluster every node needs this repository at the same path, and Ray started from its venv.
                ray.init(address=args.address, runtime_env={"env_vars": {"PYTHONPATH": root}})
            else:
                # Ray's workers inherit this process's environment: they find zimage as this process does.
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root])
                context = ray.init(object_store_memory=args.object_store_mb * 2**20, include_dashboard=False)
                log.info("local Ray instance started; its logs are in %s",
                         Path(context.address_info.get("session_dir", "")) / "logs")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at {args.address!r} (--address)" if args.address else "start Ray"
            print(f"error: cannot {where}: {_last_line(str(exc))}", file=sys.stderr)
            return EXIT_BAD_SETTINGS if args.address else EXIT_FAILED
        started = True
        for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets a SIGTERM handler of its own
            signal.signal(signum, on_signal)
        return _deploy_and_wait(ray, serve, settings, options)
    except _Stop as stop:
        log.info("signal %d: stopping the replicas (each finishes its requests, at most %g s)", stop.signum,
                 settings.shutdown_timeout_s)
        return EXIT_OK
    finally:
        stops.append(0)  # from here on any signal is a second one: exit at once
        if started:
            _stop_serving(ray, serve, local=not args.address)


def _deploy_and_wait(ray: Any, serve: Any, settings: Settings, options: RayOptions) -> int:
    """Deploy on the connected Ray cluster and block until a signal raises :class:`_Stop`; returns an exit status
    when the deployment cannot start."""
    cluster = ray.cluster_resources()
    deployment_options = options.deployment_options(settings, gpus_in_cluster=cluster.get("GPU", 0.0))
    for resource, amount in _required_resources(options, deployment_options).items():
        if amount > cluster.get(resource, 0.0) + 1e-9:
            print(f"error: the replicas need {amount:g} {resource} in all and the Ray cluster has "
                  f"{cluster.get(resource, 0.0):g}: lower --replicas (or --min-replicas), --replica-cpus or "
                  "--replica-gpus.", file=sys.stderr)
            return EXIT_BAD_SETTINGS
    from ray.exceptions import RayError

    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            break
        except RayError as exc:  # its HTTP proxy was not ready in time (a machine short of CPU): Ray restarts it
            if attempt == SERVE_START_ATTEMPTS:
                print(f"error: Ray Serve's HTTP proxy did not start ({attempt} tries): {_last_line(str(exc))}",
                      file=sys.stderr)
                return EXIT_FAILED
            log.warning("Ray Serve's HTTP proxy was not ready in time (try %d of %d): trying again", attempt,
                        SERVE_START_ATTEMPTS)
    log.info("deploying %s (%s): %s", DEPLOYMENT_NAME, settings.model_source, options.describe())
    application = build_application(settings, options, gpus_in_cluster=cluster.get("GPU", 0.0))
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
    except (RuntimeError, RayError) as exc:  # the replicas' own error is in the deployment's status
        print(f"error: the deployment failed: {_failure_cause(serve) or _last_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    print(f"serving the REST API on http://{settings.host}:{settings.port}/v1/ ({options.describe()})",
          file=sys.stderr, flush=True)
    threading.Event().wait()  # until a signal raises _Stop
    return EXIT_OK


def _stop_serving(ray: Any, serve: Any, *, local: bool) -> None:
    """Delete the application first, while Ray's proxy still holds the clients' connections: each replica finishes
    its requests (at most ``graceful_shutdown_timeout_s``, the shutdown timeout) before it stops. Then, for a local
    instance, stop Serve and Ray; on a cluster only this application goes."""
    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - Ray is going away anyway (e.g. its processes got the signal too)
        log.warning("the application could not be deleted cleanly: %s", _last_line(str(exc)))
    if local:
        serve.shutdown()
    ray.shutdown()
    log.info("stopped")


def _failure_cause(serve: Any) -> str | None:
    """The replicas' own error (a :class:`ZImageError`'s message, e.g. the model did not load) from the deployment's
    status message, which holds the constructor's traceback; None when there is none."""
    import re

    try:
        application = serve.status().applications.get(APP_NAME)
        deployment_status = application.deployments.get(DEPLOYMENT_NAME) if application else None
        text = deployment_status.message if deployment_status else ""
    except Exception:  # noqa: BLE001 - only for a better message
        return None
    causes = re.findall(r"zimage\.errors\.\w+: (.+)", text)
    return causes[-1].strip() if causes else None


def _last_line(text: str) -> str:
    """The last non-empty line of Ray's error text (the exception of the replica's constructor), else all of it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text

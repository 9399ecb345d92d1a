"""Z-Image-Turbo web app: ``python app.py [--demo | --model M] [--host H] [--port P] ...``.

Thin entry point: builds the settings, the generation service and the web app through factories,
loads the model in the background (``/healthz`` answers 503 until it is ready), and serves with
uvicorn. Before any of that, :func:`preflight` checks what would otherwise fail late or unclearly (the
port, the outputs folder, the device and dtype) and the app exits 2 with one ``error:`` line.

On SIGTERM or SIGINT it stops taking jobs, lets the running one finish (cancelling it after
``--shutdown-timeout-s``) and exits 0; the process is gone at most :data:`SHUTDOWN_OVERHEAD_S` seconds
after that timeout, whatever hangs. Exit statuses: 0 stopped, 1 the model failed to load, 2 a setting or
a start-up check failed, :data:`EXIT_SHUTDOWN_OVERRAN` the stop overran its bound, 128 + N a second
signal N (130 for SIGINT, 143 for SIGTERM) cut the stop short.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
import time
from typing import Callable

from zimage.preflight import port_problem, preflight  # noqa: F401 - app.port_problem is part of its interface
from zimage.settings import Settings, SettingsError, add_settings_arguments, read_auth_pairs, settings_from_args
from zimage.storage import OutputStore, gradio_cache_dir

log = logging.getLogger("zimage.app")

# --- How long a stop may take after --shutdown-timeout-s (seconds) ---------------------------------
#: The cancelled job stops at its next denoising step (a step of the real model on a GPU takes well
#: under a second with the placements the planner picks; the offloads that stream weights take longer).
CANCEL_GRACE_S = 10.0
#: After the last job, how long files are still served before the server closes (clients fetch the image
#: after they are told the result).
RESULT_DELIVERY_GRACE_S = 2.0
#: uvicorn's ``timeout_graceful_shutdown``: open connections get this long to finish before their tasks
#: are cancelled (Gradio's heartbeat streams are ended before, see GracefulServer).
GRACEFUL_CLOSE_S = 5.0
#: The app's lifespan shutdown and the interpreter's exit.
EXIT_SLACK_S = 3.0
#: The process is gone at most this long after --shutdown-timeout-s has passed (a watchdog enforces it).
#: Supervisor's ``stopwaitsecs`` must be larger than the timeout plus this.
SHUTDOWN_OVERHEAD_S = CANCEL_GRACE_S + RESULT_DELIVERY_GRACE_S + GRACEFUL_CLOSE_S + EXIT_SLACK_S
#: Exit status when the watchdog ends a stop that overran ``shutdown_timeout_s + SHUTDOWN_OVERHEAD_S``.
EXIT_SHUTDOWN_OVERRAN = 3


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the command line and ``ZIMAGE_*`` variables."""
    parser = argparse.ArgumentParser(prog="app.py", description="Serve Z-Image-Turbo over the web (Gradio UI, "
                                     "HTTP API, /healthz, /metrics).")
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def exposure_warning(host: str, has_auth: bool) -> str | None:
    """The warning to print when the server is reachable from other machines without a password, else None."""
    if has_auth or _is_loopback(host):
        return None
    return (f"listening on {host} without authentication: anyone who can reach this port can use the GPU. "
            "Set --auth-file (or ZIMAGE_AUTH), or bind to 127.0.0.1 behind a reverse proxy.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def _end_gradio_streams(app) -> None:
    """End the Gradio heartbeat streams of every Gradio app mounted in ``app`` (run inside the event loop).

    Each open page and API client holds one open forever; Gradio ends them when its app's ``stop_event`` is
    set, which is what its own ``Blocks.close()`` does for a launched app (for an app mounted with
    ``mount_gradio_app`` that method finds no app and does nothing). Without this, uvicorn's graceful close
    waits for the streams, gives up after GRACEFUL_CLOSE_S and logs their cancellation as an ERROR with a
    traceback on every normal stop.
    """
    import asyncio

    for route in getattr(app, "routes", ()):
        stop_event = getattr(getattr(route, "app", None), "stop_event", None)
        if isinstance(stop_event, asyncio.Event):
            stop_event.set()


class GracefulServer:
    """uvicorn server whose first stop signal drains the service before uvicorn shuts down.

    First SIGTERM/SIGINT: refuse new jobs (``service.begin_shutdown()``), let the running one finish or be
    cancelled (``service.wait_idle(shutdown_timeout_s)``), keep serving files RESULT_DELIVERY_GRACE_S, then
    close; a watchdog ends the process with EXIT_SHUTDOWN_OVERRAN if it still runs ``shutdown_timeout_s +
    overhead_s`` seconds after the signal. A second signal exits at once with status 128 + its number.
    """

    def __init__(self, app, settings: Settings, service, *, overhead_s: float = SHUTDOWN_OVERHEAD_S,
                 exit_now: Callable[[int], None] = os._exit) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:  # called from uvicorn's signal handler
                outer.begin_drain(sig)

            async def shutdown(self, sockets=None) -> None:
                _end_gradio_streams(outer.app)
                await super().shutdown(sockets=sockets)

        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=int(GRACEFUL_CLOSE_S), lifespan="on")
        self.app = app
        self.server = _Server(config)
        self.settings = settings
        self.service = service
        self.overhead_s = overhead_s
        self._exit_now = exit_now
        self._draining = False

    def begin_drain(self, sig) -> None:
        """Start the stop described in the class docstring; ``sig`` is the signal number."""
        if self._draining:
            code = 128 + int(sig)  # what a shell reports for a process killed by that signal
            log.warning("second signal %s: exiting now with status %d, without waiting for the job", sig, code)
            self._exit_now(code)
            return
        self._draining = True
        bound_s = self.settings.shutdown_timeout_s + self.overhead_s
        log.info("signal %s: refusing new jobs, letting the running one finish (at most %.0f s)", sig,
                 self.settings.shutdown_timeout_s)
        self.service.begin_shutdown()

        def drain() -> None:
            try:
                idle = self.service.wait_idle(self.settings.shutdown_timeout_s, cancel_wait_s=CANCEL_GRACE_S)
                log.info("no job running, stopping" if idle else "the job did not stop in time; stopping anyway")
                # The last result is announced before its image is fetched: keep serving files a moment.
                time.sleep(RESULT_DELIVERY_GRACE_S)
            finally:  # a failing wait_idle still stops the server (its error is printed by the thread)
                self.server.should_exit = True

        def watchdog() -> None:
            # Daemon: it dies with a process that exits in time, and still runs while the interpreter waits
            # for a non-daemon thread that hangs.
            time.sleep(bound_s)
            log.error("the stop took longer than %g s (--shutdown-timeout-s %g + %g): exiting now with status %d",
                      bound_s, self.settings.shutdown_timeout_s, self.overhead_s, EXIT_SHUTDOWN_OVERRAN)
            self._exit_now(EXIT_SHUTDOWN_OVERRAN)

        threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
        threading.Thread(target=drain, name="drain", daemon=True).start()

    def run(self) -> None:
        self.server.run()


def main(argv: list[str] | None = None, *, service_factory: Callable | None = None) -> int:
    """Entry point: returns the exit code. ``service_factory(settings, on_fatal)`` builds the generation service
    (default :class:`zimage.service.GenerationService`; tests pass one whose GPU misbehaves)."""
    try:
        settings = parse_settings(argv)
        auth_pairs = read_auth_pairs(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = preflight(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Before gradio is imported: some of its modules read this at import time.
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_cache_dir(settings, os.environ))
    from zimage.hardware import configure_cuda_allocator

    configure_cuda_allocator(os.environ)  # before the first CUDA allocation
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from zimage.logs import configure_logging
    from zimage.service import GenerationService
    from zimage.web import build_app

    configure_logging()
    removed = OutputStore(settings.outputs_dir).remove_stale_partials()
    if removed:
        log.info("removed %d partial file(s) left in %s by a process that stopped while saving", removed,
                 settings.outputs_dir)
    warning = exposure_warning(settings.host, bool(auth_pairs))
    if warning:
        log.warning(warning)
    stopping: list[GracefulServer] = []

    def on_fatal(message: str) -> None:
        # The service lost its pipeline or the GPU context: exit 1 (below) so Supervisor starts a fresh process,
        # after the failed job's client was told (/healthz answers 503 meanwhile).
        log.error("exiting for a restart in %.0f s: %s", RESULT_DELIVERY_GRACE_S, message)

        def stop() -> None:
            time.sleep(RESULT_DELIVERY_GRACE_S)
            if stopping:
                stopping[0].server.should_exit = True

        threading.Thread(target=stop, name="fatal-exit", daemon=True).start()

    if service_factory is None:
        service = GenerationService(settings, on_fatal=on_fatal)
    else:
        service = service_factory(settings, on_fatal)
    server = GracefulServer(build_app(settings, service), settings, service)
    stopping.append(server)

    def load() -> None:
        try:
            service.load()
        except Exception as exc:  # noqa: BLE001 - one clear line, then exit 1 so a supervisor sees it
            log.error("model failed to load: %s", exc)
            server.server.should_exit = True

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    log.info("serving on http://%s:%d (model %s loading)", settings.host, settings.port, settings.model_source)
    server.run()
    if service.state == "failed":
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

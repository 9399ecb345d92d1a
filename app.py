"""Z-Image-Turbo web app: ``python app.py [--demo | --model M] [--host H] [--port P] ...``.

Thin entry point: builds the settings, the generation service and the web app through factories,
loads the model in the background (``/healthz`` answers 503 until it is ready), and serves with
uvicorn. On SIGTERM or SIGINT it stops taking jobs, lets the running one finish (cancelling it after
``--shutdown-timeout-s``) and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
import time

from zimage.settings import Settings, SettingsError, add_settings_arguments, read_auth_pairs, settings_from_args
from zimage.storage import gradio_cache_dir

log = logging.getLogger("zimage.app")
#: After the last job, how long files are still served before the server closes (clients fetch the image
#: after they are told the result).
RESULT_DELIVERY_GRACE_S = 2.0


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


class GracefulServer:
    """uvicorn server whose first stop signal drains the service before uvicorn shuts down."""

    def __init__(self, app, settings: Settings, service) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:  # called from uvicorn's signal handler
                outer.begin_drain(sig)

        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=5, lifespan="on")
        self.server = _Server(config)
        self.settings = settings
        self.service = service
        self._draining = False

    def begin_drain(self, sig) -> None:
        if self._draining:  # a second signal: stop now
            self.server.force_exit = True
            self.server.should_exit = True
            return
        self._draining = True
        log.info("signal %s: refusing new jobs, letting the running one finish (at most %.0f s)", sig,
                 self.settings.shutdown_timeout_s)
        self.service.begin_shutdown()

        def drain() -> None:
            idle = self.service.wait_idle(self.settings.shutdown_timeout_s)
            log.info("no job running, stopping" if idle else "the job did not stop in time; stopping anyway")
            # The last result is announced before its image is fetched: keep serving files a moment.
            time.sleep(RESULT_DELIVERY_GRACE_S)
            self.server.should_exit = True

        threading.Thread(target=drain, name="drain", daemon=True).start()

    def run(self) -> None:
        self.server.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code."""
    try:
        settings = parse_settings(argv)
        auth_pairs = read_auth_pairs(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Before gradio is imported: some of its modules read this at import time.
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_cache_dir(settings, os.environ))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from zimage.logs import configure_logging
    from zimage.service import GenerationService
    from zimage.web import build_app

    configure_logging()
    warning = exposure_warning(settings.host, bool(auth_pairs))
    if warning:
        log.warning(warning)
    service = GenerationService(settings)
    server = GracefulServer(build_app(settings, service), settings, service)

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

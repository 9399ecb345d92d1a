"""Checks before a slow start (building the demo model, loading weights, importing Gradio or starting Ray): what
would otherwise fail late or unclearly, each as one line naming the setting and the fix. Used by ``app.py`` and by
``python -m zimage serve-ray``."""

from __future__ import annotations

import errno
import socket
from typing import Callable

from .settings import Settings
from .storage import OutputStore


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host``:``port`` (one line naming the setting and the fix), or None.

    Binds every address ``host`` resolves to as uvicorn will (SO_REUSEADDR, so connections of a previous
    run in TIME_WAIT do not count as busy), then closes the sockets again. Never raises.
    """
    setting = f"port {port} (--port or ZIMAGE_PORT)"
    try:
        addresses = {info[4][:2]: info[0] for info in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                           flags=socket.AI_PASSIVE)}
    except socket.gaierror:
        return (f"host {host!r} (--host or ZIMAGE_HOST) is not a known address or name: use an IP address of this "
                "machine, 127.0.0.1 or 0.0.0.0.")
    for address, family in addresses.items():
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's create_server does
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"{setting} on {host} is already in use by another process: choose another port or stop "
                        "that process.")
            if exc.errno == errno.EADDRNOTAVAIL:
                return (f"host {host!r} (--host or ZIMAGE_HOST) is not an address of this machine: use one of its "
                        "addresses, 127.0.0.1 or 0.0.0.0.")
            if exc.errno in (errno.EACCES, errno.EPERM):
                return (f"{setting} needs administrator rights to listen on: use a port of 1024 or more (put a "
                        "reverse proxy in front for port 80/443).")
            return f"cannot listen on {host}:{port} (--host/--port, ZIMAGE_HOST/ZIMAGE_PORT): {exc.strerror or exc}."
        finally:
            sock.close()
    return None


def preflight(settings: Settings, probe: Callable | None = None) -> str | None:
    """Check what would make the app fail after a slow start; return the first problem as one line, or None.

    In order: the port is free (:func:`port_problem`), the outputs folder is usable
    (:meth:`OutputStore.problem`), a ``--transformer-file`` is a readable GGUF file, and the device, dtype and
    memory profile can work on this machine (the hardware probe, ``probe`` by default
    :func:`zimage.hardware.probe_devices`, and the planner; e.g. ``--dtype fp16`` where ``--device auto`` finds no
    GPU), and a named attention kernel is installed (:func:`setup_problem`). Runs before the demo model is built, the
    model loaded or Gradio imported. Never raises for these problems.
    """
    problem = port_problem(settings.host, settings.port)
    if problem:
        return problem
    problem = OutputStore(settings.outputs_dir).problem()
    if problem:
        return f"outputs folder: {problem}"
    return setup_problem(settings, probe)


def transformer_file_problem(settings: Settings) -> str | None:
    """Why ``settings.transformer_file`` cannot be used with ``settings.model`` (one line), or None (also when there is
    none): a readable GGUF file whose tensors make the model's transformer (:func:`zimage.gguf_files.layout_problem`
    against :func:`zimage.lora.transformer_config_origin`, the config LoRAs are checked against too). Reads headers
    and small JSON files only."""
    if settings.transformer_file is None:
        return None
    from pathlib import Path

    from .gguf_files import gguf_file_problem, layout_problem
    from .errors import shown
    from .lora import transformer_config_origin

    path = Path(settings.transformer_file).expanduser()
    problem = gguf_file_problem(path)
    if problem:
        return problem
    config, origin = transformer_config_origin(settings)
    model = {"demo": "the demo model", "folder": shown(settings.model, 200),
             "published": f"{shown(settings.model, 200)} (its published architecture)"}[origin]
    return layout_problem(path, config, model)


def setup_problem(settings: Settings, probe: Callable | None = None) -> str | None:
    """The checks of :func:`preflight` that do not concern serving (also run by ``python -m zimage generate``
    before it loads the model): the GGUF transformer file is readable, the device, dtype and memory profile can
    work here, and a named attention kernel is installed. One line, or None. Never raises for these problems."""
    problem = transformer_file_problem(settings)
    if problem:
        return problem
    from dataclasses import replace

    from .loader import plan_for
    from .planner import PUBLISHED_SIZES, PlanError

    if probe is None:
        from .hardware import probe_devices as probe
    sizes = PUBLISHED_SIZES
    if settings.transformer_file is not None:  # quantized: what the planner refuses with it (fp8-storage) shows here
        from pathlib import Path

        from .gguf_files import gguf_transformer_stats

        sizes = replace(sizes, transformer=gguf_transformer_stats(Path(settings.transformer_file).expanduser()))
    try:
        # Only the errors matter here, and they do not depend on the model's sizes.
        plan = plan_for(settings, probe(), sizes)
    except PlanError as exc:
        return str(exc)
    from .attention import AttentionBackendError, choose_backend, module_installed

    try:  # a named kernel whose package is missing: say so now, not after the model has loaded
        choose_backend(settings.attention_backend, cuda=plan.device.startswith("cuda"), compute_capability=None,
                       installed=module_installed)
    except AttentionBackendError as exc:
        return str(exc)
    return None

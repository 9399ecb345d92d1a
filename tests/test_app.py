"""app.py's own decisions: settings parsing, the exposure warning, the start-up checks (exit 2) and the stop
(drain, watchdog, second signal) without a server; the real app only for the refusals."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import app
from servers import ROOT, free_port
from zimage.planner import hypothetical_devices
from zimage.settings import Settings


@pytest.mark.parametrize("host, has_auth, warned", [
    ("127.0.0.1", False, False),
    ("127.0.0.2", False, False),  # all of 127/8 is loopback
    ("::1", False, False),
    ("localhost", False, False),
    ("0.0.0.0", False, True),
    ("::", False, True),
    ("192.168.1.20", False, True),
    ("gpu-box.example", False, True),  # a name may resolve to anything
    ("0.0.0.0", True, False),
])
def test_exposure_warning_only_for_reachable_hosts_without_auth(host: str, has_auth: bool, warned: bool) -> None:
    warning = app.exposure_warning(host, has_auth)
    assert (warning is not None) == warned
    if warned:
        assert host in warning and "--auth-file" in warning


def test_app_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_QUEUE_SIZE", "3")
    monkeypatch.setenv("ZIMAGE_PORT", "7999")
    settings = app.parse_settings(["--demo", "--port", "7861", "--host", "0.0.0.0"])
    assert settings.demo and settings.port == 7861 and settings.host == "0.0.0.0" and settings.queue_size == 3


def test_bad_setting_exits_2_with_the_message(capsys: pytest.CaptureFixture) -> None:
    assert app.main(["--demo", "--queue-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "queue" in err and "0" in err and "Traceback" not in err


# --- Start-up checks: exit 2 with one line, before anything slow ------------------------------------

def listening_socket() -> socket.socket:
    """Another process's server, as far as the app can tell: a socket listening on a loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_busy_port_exits_2_naming_the_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        assert app.main(["--demo", "--port", str(port), "--outputs-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"port {port} (--port or ZIMAGE_PORT) on 127.0.0.1 is already in use by another process: choose " \
           "another port or stop that process." in err


def test_free_port_passes_and_stays_free() -> None:
    port = free_port()
    assert app.port_problem("127.0.0.1", port) is None
    with socket.socket() as again:  # the check closed its socket
        again.bind(("127.0.0.1", port))
    assert "is not an address of this machine" in app.port_problem("192.0.2.1", port)  # TEST-NET-1, never local


def test_outputs_folder_that_cannot_be_created_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A path under a regular file cannot be a folder, even for root (whom chmod does not stop).
    (tmp_path / "file").write_text("not a folder")
    outputs = tmp_path / "file" / "outputs"
    assert app.main(["--demo", "--port", str(free_port()), "--outputs-dir", str(outputs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: outputs folder: ") and str(outputs) in err and "--outputs-dir" in err
    assert "ZIMAGE_OUTPUTS_DIR" in err and "Traceback" not in err


def test_preflight_resolves_device_and_dtype_with_the_probe(tmp_path: Path) -> None:
    def settings(**kw) -> Settings:
        return Settings(demo=True, port=free_port(), outputs_dir=tmp_path / "out", **kw)

    no_gpu = lambda: hypothetical_devices(0)  # noqa: E731
    one_gpu = lambda: hypothetical_devices(24)  # noqa: E731
    assert "--dtype fp16 would run on the CPU (this machine has no CUDA GPU)" in app.preflight(
        settings(dtype="fp16"), probe=no_gpu)
    assert app.preflight(settings(dtype="fp16"), probe=one_gpu) is None
    assert app.preflight(settings(), probe=no_gpu) is None
    assert "needs a CUDA GPU" in app.preflight(settings(memory_profile="full"), probe=no_gpu)
    assert "device='cuda:1' was asked for" in app.preflight(settings(device="cuda:1"), probe=one_gpu)


def run_app(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python app.py --demo ARGS`` with its own data folder; returns the result and the seconds it ran."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    env.update(ZIMAGE_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "app.py", "--demo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return done, time.perf_counter() - started


def test_refusals_of_the_real_app(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The three refusals from the command line: status 2, one line, nothing built (fp16 on this GPU-less CPU)."""
    from zimage.hardware import probe_devices

    if probe_devices().has_gpu:
        pytest.skip("fp16 is only refused without a GPU")
    outputs = str(tmp_path / "out")
    (tmp_path / "file").write_text("x")
    timings = {}
    with listening_socket() as busy:
        for name, args, expected in [
            ("busy port", ["--port", str(busy.getsockname()[1]), "--outputs-dir", outputs], "already in use"),
            ("bad outputs", ["--port", str(free_port()), "--outputs-dir", str(tmp_path / "file" / "o")],
             "--outputs-dir"),
            ("fp16 without GPU", ["--port", str(free_port()), "--outputs-dir", outputs, "--dtype", "fp16"],
             "--dtype fp16 would run on the CPU (this machine has no CUDA GPU)"),
        ]:
            done, timings[name] = run_app(tmp_path, *args)
            assert done.returncode == 2, (name, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, done.stderr)
            assert "Traceback" not in done.stderr
    data = tmp_path / "data"
    assert not data.exists() or not any(data.rglob("*")), list(data.rglob("*"))  # no demo model was built
    with capsys.disabled():
        print("\n[start-up refusals] " + ", ".join(f"{k}: exit 2 after {v:.1f} s" for k, v in timings.items()))


# --- The stop: drain, watchdog, second signal (without a real server) -------------------------------

class FakeService:
    def __init__(self, hang: bool) -> None:
        self.calls: list = []
        self.release = threading.Event()
        self.hang = hang

    def begin_shutdown(self) -> None:
        self.calls.append("begin_shutdown")

    def wait_idle(self, timeout_s: float, cancel_wait_s: float) -> bool:
        assert cancel_wait_s == app.CANCEL_GRACE_S  # the service's wait for a cancelled step fits the bound
        self.calls.append(("wait_idle", timeout_s))
        if self.hang:
            self.release.wait()
        return not self.hang


async def no_app(scope, receive, send) -> None:  # pragma: no cover - never served
    raise AssertionError("not served in these tests")


def graceful(tmp_path: Path, service: FakeService, overhead_s: float):
    exits: queue.Queue = queue.Queue()
    settings = Settings(demo=True, shutdown_timeout_s=0.2, outputs_dir=tmp_path)
    return app.GracefulServer(no_app, settings, service, overhead_s=overhead_s, exit_now=exits.put), exits


def test_a_stop_that_hangs_is_ended_by_the_watchdog(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = FakeService(hang=True)
    server, exits = graceful(tmp_path, service, overhead_s=0.3)
    started = time.monotonic()
    server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    code = exits.get(timeout=60)
    waited = time.monotonic() - started
    try:
        assert code == app.EXIT_SHUTDOWN_OVERRAN
        assert waited >= 0.5  # not before shutdown_timeout_s + overhead_s
        assert service.calls == ["begin_shutdown", ("wait_idle", 0.2)]
        assert not server.server.should_exit  # the drain never got there
        assert "the stop took longer than 0.5 s (--shutdown-timeout-s 0.2 + 0.3): exiting now with status 3" \
            in caplog.text
    finally:
        service.release.set()


def test_a_second_signal_exits_at_once_and_a_normal_drain_closes_the_server(tmp_path: Path) -> None:
    service = FakeService(hang=False)
    server, exits = graceful(tmp_path, service, overhead_s=600)
    server.begin_drain(signal.SIGTERM)
    assert exits.empty()
    server.begin_drain(signal.SIGINT)
    assert exits.get_nowait() == 128 + signal.SIGINT  # 130
    assert service.calls.count("begin_shutdown") == 1
    deadline = time.monotonic() + 60
    while not server.server.should_exit and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.server.should_exit and service.calls == ["begin_shutdown", ("wait_idle", 0.2)]
    assert exits.empty()  # the watchdog (600 s away) did not fire


def test_overhead_constant_covers_its_parts() -> None:
    assert app.SHUTDOWN_OVERHEAD_S >= app.CANCEL_GRACE_S + app.RESULT_DELIVERY_GRACE_S + app.GRACEFUL_CLOSE_S

"""Supervisor for real: the local supervisord.conf run as documented, and the production configs parsed.

The local config is run from a temporary tree shaped like the repository (links to app.py, zimage/ and
the virtualenv, a copy of deploy/supervisor/supervisord.conf, an owner-only run/ folder), so a server
the developer has running from the checkout is never touched.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from servers import ROOT, free_port, get

pytestmark = pytest.mark.server

BIN = Path(sys.executable).parent
CONF = "deploy/supervisor/supervisord.conf"


class Supervised:
    """A supervisord started the documented way inside ``tree``."""

    def __init__(self, tree: Path, env: dict) -> None:
        self.tree, self.env = tree, env
        self.port = int(env["ZIMAGE_PORT"])
        self.url = f"http://127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([str(BIN / "supervisorctl"), "-c", CONF, *args], cwd=self.tree, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr

    def pid(self) -> int:
        out = self.ctl("pid", "z-image-turbo").strip()
        return int(out) if out.isdigit() else 0

    def state(self) -> str:
        """Supervisor's state of the program: RUNNING, STARTING, STOPPED, ..."""
        return self.ctl("status", "z-image-turbo").split()[1]

    def wait_healthy(self, timeout: float = 120, not_pid: int = 0, running: bool = True) -> float:
        """Seconds until a process other than ``not_pid`` answers /healthz with 200 (and, with ``running``,
        Supervisor calls it RUNNING, which it does ``startsecs`` after the start)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                status, _ = get(self.url + "healthz", timeout=2)
            except OSError:
                status = 0
            if status == 200 and self.pid() not in (0, not_pid) and (not running or self.state() == "RUNNING"):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"not healthy in {timeout} s:\n{self.ctl('status')}\n{self.app_log()}")

    def app_log(self) -> str:
        path = self.tree / "run" / "z-image-turbo.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def supervisord_log(self) -> str:
        return (self.tree / "run" / "supervisord.log").read_text(errors="replace")


def make_tree(tmp: Path) -> Path:
    tree = tmp / "repo"
    (tree / "deploy" / "supervisor").mkdir(parents=True)
    shutil.copy(ROOT / CONF, tree / CONF)
    (tree / "app.py").symlink_to(ROOT / "app.py")
    (tree / "zimage").symlink_to(ROOT / "zimage", target_is_directory=True)
    (tree / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (tree / "run").mkdir(mode=0o700)  # what scripts/install.sh creates
    return tree


@contextlib.contextmanager
def supervisord_in(tree: Path, data_dir: Path):
    """supervisord started the README's way from the root of ``tree`` on a free port; shut down afterwards."""
    env = {**os.environ, "ZIMAGE_PORT": str(free_port()), "ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("ZIMAGE_DEMO", None)
    # Exactly the README's command, from the root of the tree; supervisord daemonizes.
    started = subprocess.run([str(BIN / "supervisord"), "-c", CONF], cwd=tree, env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    sup = Supervised(tree, env)
    try:
        yield sup
    finally:
        sup.ctl("shutdown")
        pid_file = tree / "run" / "supervisord.pid"
        deadline = time.monotonic() + 90
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.exists():  # never leave a supervisord behind
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="module")
def supervised(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with supervisord_in(make_tree(tmp_path_factory.mktemp("supervisor")), data_dir) as sup:
        yield sup


def test_runs_as_documented_with_demo_default_and_env_port(supervised: Supervised) -> None:
    supervised.wait_healthy()
    assert re.search(r"z-image-turbo\s+RUNNING\s+pid \d+", supervised.ctl("status", "z-image-turbo"))
    _, body = get(supervised.url + "healthz")
    assert json.loads(body)["model"] == "demo (random weights)"
    run = supervised.tree / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert stat.S_IMODE((run / "supervisor.sock").stat().st_mode) & 0o077 == 0  # owner only
    assert stat.S_IMODE((run / "z-image-turbo.log").stat().st_mode) & 0o077 == 0


def test_restart_brings_a_new_process(supervised: Supervised) -> None:
    supervised.wait_healthy()
    before = supervised.pid()
    out = supervised.ctl("restart", "z-image-turbo")
    assert "stopped" in out and "started" in out, out
    supervised.wait_healthy(not_pid=before)


def test_kill_9_is_followed_by_a_new_healthy_process(supervised: Supervised, capsys: pytest.CaptureFixture) -> None:
    supervised.wait_healthy()
    victim = supervised.pid()
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    supervised.wait_healthy(not_pid=victim, timeout=120, running=False)
    serving = time.monotonic() - killed
    supervised.wait_healthy(not_pid=victim, timeout=120)
    running = time.monotonic() - killed
    with capsys.disabled():
        print(f"\n[supervisor] kill -9 -> new process answers /healthz 200 after {serving:.1f} s; "
              f"Supervisor shows RUNNING after {running:.1f} s (startsecs=10)")
    assert "exit status" in supervised.supervisord_log() or "terminated by SIGKILL" in supervised.supervisord_log()


def test_stop_during_a_generation_lets_it_finish_and_exits_0(supervised: Supervised, tmp_path: Path) -> None:
    from gradio_client import Client

    supervised.wait_healthy()
    job = Client(supervised.url, verbose=False, download_files=str(tmp_path)).submit(
        "finish me", 1024, 1024, 16, 5, 1, api_name="/generate")
    while not job.status().progress_data:
        time.sleep(0.05)
    out = supervised.ctl("stop", "z-image-turbo")
    assert "stopped" in out, out
    gallery, info = job.result(timeout=60)
    assert info["seed"] == 5 and (supervised.tree / "outputs" / info["files"][0]).is_file()
    log = supervised.supervisord_log()
    assert "stopped: z-image-turbo (exit status 0)" in log, log
    assert "SIGKILL" not in log.split("waiting for z-image-turbo to stop")[-1]
    assert "refusing new jobs" in supervised.app_log()
    supervised.ctl("start", "z-image-turbo")
    supervised.wait_healthy()


def test_a_service_that_loses_its_model_exits_and_supervisor_restarts_it(data_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """tests/faulty_app.py: the first request runs out of memory, the reload it needs fails and so does the
    fallback. /healthz turns 503, the process exits 1, and Supervisor starts a fresh one."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    tree = make_tree(tmp_path)
    (tree / "app.py").unlink()
    (tree / "app.py").write_text("import runpy\n"
                                 f"runpy.run_path({str(ROOT / 'tests' / 'faulty_app.py')!r}, run_name='__main__')\n")
    with supervisord_in(tree, data_dir) as sup:
        sup.wait_healthy(running=False)
        first = sup.pid()
        health: list[int] = []
        stop = threading.Event()

        def watch_health() -> None:
            while not stop.is_set():
                try:
                    health.append(get(sup.url + "healthz", timeout=2)[0])
                except OSError:
                    health.append(0)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_health, daemon=True)
        watcher.start()
        with pytest.raises(AppError, match="restarts itself"):
            Client(sup.url, verbose=False, download_files=str(tmp_path)).predict(
                "a cat", 256, 256, 2, 1, 1, api_name="/generate")
        failed = time.monotonic()
        sup.wait_healthy(not_pid=first, timeout=120, running=False)
        stop.set()
        watcher.join(5)
        with capsys.disabled():
            print(f"\n[supervisor] lost model -> new process healthy after {time.monotonic() - failed:.1f} s")
        assert 503 in health, health  # the failed service said so before it went
        assert "exited: z-image-turbo (exit status 1; not expected)" in sup.supervisord_log()
        log = sup.app_log()
        assert "reloading the pipeline for model-offload" in log and "exiting for a restart" in log


# --- The production configs, through supervisor's own parser --------------------------------------

def render_production(name: str, tmp: Path) -> Path:
    """The config with its install paths moved under ``tmp`` and this user as the service user."""
    text = (ROOT / "deploy" / "supervisor" / name).read_text()
    for prefix in ("/opt/z-image-turbo", "/var/lib/z-image-turbo", "/var/log/z-image-turbo"):
        local = tmp / prefix.strip("/").replace("/", "-")
        local.mkdir(exist_ok=True)
        text = text.replace(prefix, str(local))
    text = text.replace("user=zimage", f"user={getpass.getuser()}")
    (tmp / name).write_text(text)
    main = tmp / "supervisord.conf"
    main.write_text(f"[supervisord]\nlogfile={tmp}/supervisord.log\npidfile={tmp}/supervisord.pid\n"
                    f"[include]\nfiles={tmp / name}\n")
    return main


def parsed_programs(name: str, tmp: Path) -> list:
    from supervisor.options import ServerOptions

    options = ServerOptions()
    options.realize(["-c", str(render_production(name, tmp))])
    return [p for group in options.process_group_configs for p in group.process_configs]


def test_production_config_parses_with_supervisors_parser(tmp_path: Path) -> None:
    from supervisor.datatypes import RestartUnconditionally

    (program,) = parsed_programs("z-image-turbo.conf", tmp_path)
    assert program.name == "z-image-turbo" and program.uid == os.getuid()
    assert program.command.split()[1:] == ["app.py", "--host", "127.0.0.1", "--port", "7860"]
    assert program.autostart and program.autorestart is RestartUnconditionally
    assert program.stopsignal == signal.SIGTERM and program.stopasgroup and program.killasgroup
    assert program.startsecs >= 60 and program.startretries >= 1
    assert program.redirect_stderr and program.stdout_logfile_maxbytes == 50 * 1024 * 1024
    assert program.stdout_logfile_backups == 10
    assert program.environment["PYTHONUNBUFFERED"] == "1" and program.environment["CUDA_VISIBLE_DEVICES"] == "0"
    assert program.environment["ZIMAGE_LOG_PROMPTS"] == "0"


def test_multi_gpu_variant_gives_one_process_per_gpu_and_port(tmp_path: Path) -> None:
    programs = parsed_programs("z-image-turbo-multi-gpu.conf", tmp_path)
    assert [(p.name, p.command.split()[-1], p.environment["CUDA_VISIBLE_DEVICES"]) for p in programs] == [
        ("z-image-turbo-gpu0", "7860", "0"), ("z-image-turbo-gpu1", "7861", "1")]
    assert len({p.stdout_logfile for p in programs}) == 2


#: How much longer than the app's own stop bound Supervisor waits before its SIGKILL.
STOP_MARGIN_S = 5


@pytest.mark.parametrize("name", ["z-image-turbo.conf", "z-image-turbo-multi-gpu.conf", "supervisord.conf"])
def test_stopwaitsecs_outlasts_the_apps_own_stop_bound(name: str, tmp_path: Path) -> None:
    """The app is gone at most shutdown timeout + app.SHUTDOWN_OVERHEAD_S after SIGTERM (its watchdog sees to
    it); Supervisor must wait longer, or it SIGKILLs a stop that is still within its bound."""
    import app
    from zimage.settings import Settings

    if name == "supervisord.conf":
        from supervisor.options import ServerOptions

        tree = make_tree(tmp_path)
        options = ServerOptions()
        options.realize(["-c", str(tree / CONF)])
        programs = [p for group in options.process_group_configs for p in group.process_configs]
    else:
        programs = parsed_programs(name, tmp_path)
    assert programs
    for program in programs:
        # The local config takes the timeout from supervisord's environment: the app's default unless set.
        timeout = float(program.environment.get("ZIMAGE_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
        assert program.stopwaitsecs >= timeout + app.SHUTDOWN_OVERHEAD_S + STOP_MARGIN_S, (
            name, program.stopwaitsecs, timeout, app.SHUTDOWN_OVERHEAD_S)


@pytest.mark.parametrize("name", ["z-image-turbo.conf", "z-image-turbo-multi-gpu.conf", "supervisord.conf"])
def test_every_key_says_why(name: str) -> None:
    """Each setting line in a [program] section follows a comment line (the multi-GPU file documents only
    what differs from z-image-turbo.conf, so there it is checked for the keys it adds)."""
    lines = (ROOT / "deploy" / "supervisor" / name).read_text().splitlines()
    in_program = False
    documented_elsewhere = set()
    if name == "z-image-turbo-multi-gpu.conf":
        base = (ROOT / "deploy" / "supervisor" / "z-image-turbo.conf").read_text()
        documented_elsewhere = {line.split("=")[0] for line in base.splitlines() if re.match(r"^\w+=", line)}
    for previous, line in zip([""] + lines, lines):
        if line.startswith("["):
            in_program = line.startswith("[program:")
        elif in_program and re.match(r"^\w+=", line) and line.split("=")[0] not in documented_elsewhere:
            assert previous.startswith(";"), f"{name}: no comment above {line!r}"


def test_cron_entry_runs_the_cleanup(tmp_path: Path) -> None:
    """The crontab line, with its install paths moved here, runs and cleans (every 10 minutes)."""
    text = (ROOT / "deploy" / "cron" / "z-image-turbo-cleanup").read_text()
    entries = [line for line in text.splitlines() if line and not line.startswith("#") and "=" not in line.split()[0]]
    (entry,) = entries
    fields = entry.split(None, 6)
    assert fields[:5] == ["*/10", "*", "*", "*", "*"] and fields[5] == "zimage"
    outputs, logs = tmp_path / "outputs", tmp_path / "log"
    logs.mkdir()
    old = outputs / "old.png"
    outputs.mkdir()
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    command = (fields[6].replace("/opt/z-image-turbo", str(ROOT)).replace("/var/log/z-image-turbo", str(logs))
               .replace(".venv/bin/python", sys.executable))
    env = {**os.environ, "ZIMAGE_OUTPUTS_DIR": str(outputs), "ZIMAGE_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data" / "gradio-cache").mkdir(parents=True)
    done = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (logs / "cleanup.log").read_text()
    assert not old.exists() and "deleted 1 files" in (logs / "cleanup.log").read_text()

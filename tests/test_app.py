"""app.py's own decisions (without starting a server): settings parsing and the exposure warning."""

from __future__ import annotations

import pytest

import app


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

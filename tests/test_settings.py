"""Settings: precedence (flag > env > default), parsing and validation messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from zimage.settings import (
    Settings,
    SettingsError,
    add_settings_arguments,
    env_name,
    read_auth_pairs,
    settings_from_args,
)


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv), environ or {})


def test_defaults_are_turbo_friendly() -> None:
    s = parse([])
    assert s.model == "Tongyi-MAI/Z-Image-Turbo"
    assert (s.dtype, s.memory_profile, s.host, s.port) == ("auto", "auto", "127.0.0.1", 7860)
    assert s.demo is False and s.memory_options == ()


def test_flag_beats_environment_beats_default() -> None:
    env = {"ZIMAGE_PORT": "7001", "ZIMAGE_QUEUE_SIZE": "3", "ZIMAGE_DEMO": "yes"}
    s = parse(["--port", "7002"], env)
    assert s.port == 7002  # flag wins
    assert s.queue_size == 3  # env used
    assert s.demo is True
    assert parse(["--no-demo"], env).demo is False


def test_environment_lists_and_paths() -> None:
    s = parse([], {"ZIMAGE_MEMORY_OPTIONS": "vae-tiling, fp8-storage", "ZIMAGE_OUTPUTS_DIR": "~/out"})
    assert s.memory_options == ("vae-tiling", "fp8-storage")
    assert s.outputs_dir == Path("~/out").expanduser()


def test_every_field_has_an_env_variable_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    text = parser.format_help()
    for name in ("model", "memory_profile", "queue_size", "shutdown_timeout_s"):
        assert env_name(name) in text


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--dtype", "int8"], {}, "invalid choice"),
        ([], {"ZIMAGE_DTYPE": "int8"}, "dtype='int8' is not valid: use one of auto, bf16, fp16, fp32"),
        ([], {"ZIMAGE_MEMORY_PROFILE": "tiny"}, "memory_profile='tiny' is not valid"),
        ([], {"ZIMAGE_MEMORY_OPTIONS": "turbo-mode"}, "memory_options='turbo-mode' is not valid"),
        ([], {"ZIMAGE_PORT": "http"}, "ZIMAGE_PORT='http' is not valid: expected a whole number"),
        ([], {"ZIMAGE_PORT": "70000"}, "port=70000 is out of range: use 1 to 65535"),
        ([], {"ZIMAGE_QUEUE_SIZE": "0"}, "queue_size=0 is out of range"),
        ([], {"ZIMAGE_DEMO": "maybe"}, "ZIMAGE_DEMO='maybe' is not valid: expected true or false"),
        ([], {"ZIMAGE_DEVICE": "gpu"}, "device='gpu' is not valid: use auto, cpu, cuda or cuda:N"),
        (["--device", "cpu", "--dtype", "fp16"], {}, "60-120x slower"),
        ([], {"ZIMAGE_AUTH": "alice"}, "not 'user:password'"),
        ([], {"ZIMAGE_RESERVE_MB": "-1"}, "reserve_mb=-1 is out of range"),
        # Every setting with choices, from the environment too (found by a user: this one reached the loader).
        ([], {"ZIMAGE_ATTENTION_BACKEND": "bogus"}, "attention_backend='bogus' is not valid: use one of auto, native"),
    ],
)
def test_invalid_values_name_the_value_and_the_fix(argv: list[str], env: dict, message: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    if argv and argv[0] == "--dtype" and argv[1] == "int8":
        with pytest.raises(SystemExit):
            parse(argv, env)
        assert message in capsys.readouterr().err
        return
    with pytest.raises(SettingsError, match=None) as info:
        parse(argv, env)
    assert message in str(info.value)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_auth_pairs_from_value_and_file(tmp_path: Path) -> None:
    auth_file = tmp_path / "users"
    auth_file.write_text("# operators\nbob:secret\n\ncarol:pa:ss\n", encoding="utf-8")
    s = Settings(auth="alice:one", auth_file=auth_file)
    assert read_auth_pairs(s) == [("alice", "one"), ("bob", "secret"), ("carol", "pa:ss")]
    auth_file.write_text("nobody\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="auth_file line 1"):
        read_auth_pairs(s)
    with pytest.raises(SettingsError, match="cannot be read"):
        read_auth_pairs(Settings(auth_file=tmp_path / "missing"))

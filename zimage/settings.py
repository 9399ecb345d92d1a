"""One typed, frozen settings object, built from CLI flags and ``ZIMAGE_*`` environment variables.

Every setting is declared once, in :class:`Settings`, with its help text in the field metadata.
:func:`add_settings_arguments` turns the declarations into argparse options and
:func:`settings_from_args` merges them: a flag given on the command line wins over the
``ZIMAGE_<NAME>`` environment variable, which wins over the default. Values are validated with
messages that name the value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import shown
from .model_family import FAMILY_CHOICES

DEFAULT_MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"
ENV_PREFIX = "ZIMAGE_"

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
PROFILE_CHOICES = (
    "auto",
    "full",
    "balanced",
    "model-offload",
    "transformer-resident",
    "group-offload",
    "sequential-offload",
    "cpu",
)
OPTION_CHOICES = ("attention-slicing", "vae-tiling", "fp8-storage", "te-fp8-storage", "fp8-compute", "step-cache")
COMPILE_CHOICES = ("auto", "on", "off")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the value and the fix."""


def _default_data_dir() -> Path:
    # Resolved when a Settings object is created, never at import.
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "zimage-server"


def _setting(default: Any = None, *, help: str, choices: tuple[str, ...] | None = None,
             default_factory: Any = None, metavar: str | None = None, secret: bool = False) -> Any:
    # A secret (a password, an API key) stays out of repr(), so a logged Settings never shows it.
    metadata = {"help": help, "choices": choices, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Everything the engine, the web app and the tools can be configured with."""

    # Model and precision
    model: str = _setting(DEFAULT_MODEL_ID, help="Hub repo id or local diffusers folder of Z-Image-Turbo (or of "
                                                 "Z-Image, the base model).",
                          metavar="ID_OR_PATH")
    demo: bool = _setting(False, help="Use the built-in tiny demo model (random weights, noise images; "
                                      "no download). For trying the service and for tests.")
    controlnet: str = _setting("", metavar="ID_OR_PATH",
                               help="A Z-Image ControlNet for the controlnet modes: a diffusers folder, a .safetensors "
                                    "checkpoint, or a hub id (alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1, or "
                                    "owner/name/FILE.safetensors to pick one file of a repository). Empty: none, "
                                    "except that --demo loads the demo model's tiny ControlNet; 'none' turns that "
                                    "off.")
    model_family: str = _setting("auto", choices=FAMILY_CHOICES,
                                 help="Which Z-Image the model is, for the request defaults: turbo (8 steps, no "
                                      "guidance) or base (Tongyi-MAI/Z-Image: 28 steps, guidance 4, negative prompt). "
                                      "auto reads it from the model's scheduler config, then its name.")
    lora_dir: Path | None = _setting(None, metavar="DIR",
                                     help="Folder of LoRA adapters (.safetensors) requests may name; default "
                                          "<data-dir>/loras.")
    dtype: str = _setting("auto", choices=DTYPE_CHOICES,
                          help="Weight precision. auto: bf16 on a GPU that supports it (the model was trained "
                               "in bf16), fp16 on older GPUs; on a CPU bf16 where it has bf16 instructions "
                               "(AVX512-BF16, AMX-BF16, Arm BF16), else fp32. fp16 is refused on a CPU.")
    device: str = _setting("auto", help="auto, cpu, cuda or cuda:N. auto uses the first CUDA GPU when there is one.",
                           metavar="DEVICE")
    attention_backend: str = _setting("auto", choices=("auto", "native", "flash", "_flash_3", "sage", "_native_cudnn"),
                                      help="The transformer's attention kernel. auto: the fastest installed that runs "
                                           "on this GPU (FlashAttention 3 on Hopper, FlashAttention 2, SageAttention, "
                                           "cuDNN), native (torch SDPA) on a CPU; the choice is logged.")
    compile: str = _setting("auto", choices=COMPILE_CHOICES,
                            help="Compile the transformer's repeated blocks (torch.compile, regional) and warm it up at "
                                 "start: a slower start (logged), faster steps. auto: on CUDA GPUs, on the placements "
                                 "where it composes (full, balanced, transformer-resident, model-offload; not with "
                                 "group or sequential offload, fp8-storage, step-cache or a GGUF transformer, whose "
                                 "hooks break the compiled graph); on: also on the CPU, and a placement where it does "
                                 "not compose is refused; off: never.")
    # Memory
    memory_profile: str = _setting("auto", choices=PROFILE_CHOICES,
                                   help="How the model is placed in memory. auto lets the planner pick the fastest "
                                        "placement that fits (see `python -m zimage plan`).")
    memory_options: tuple[str, ...] = _setting(
        default_factory=tuple, metavar="OPT[,OPT]",
        help="Options always applied, comma separated: attention-slicing (accepted by diffusers but "
             "measured as no change for this model), vae-tiling (decode in tiles: big images in less "
             "memory), fp8-storage (transformer weights stored in fp8, computed in bf16: about half "
             "the transformer memory, slight quality change), te-fp8-storage (the same for the text encoder, "
             "its embeddings and norms kept in bf16), fp8-compute (the transformer's linear layers in float8 "
             "with float8 matmuls, torchao's dynamic activation and weight quantization: about half the transformer "
             "memory and faster steps on GPUs with fp8 tensor cores, compute capability 8.9 or later; needs the "
             "torchao package; full and transformer-resident only), step-cache (reuse the attention output of the "
             "previous step on every second step, diffusers' pyramid attention broadcast: faster steps, changes "
             "pixels; opt-in only).")
    auto_fp8: bool = _setting(True, help="Let the auto planner choose fp8 weights (fp8-storage, te-fp8-storage, "
                                         "fp8-compute) where it is predicted more than 5% faster than every "
                                         "lossless placement that fits, or nothing lossless fits. --no-auto-fp8 "
                                         "keeps weights lossless.")
    recovery_fp8: bool = _setting(False, help="Let out-of-memory recovery step a request down to fp8 weight storage. "
                                              "Off by default: fp8 changes pixels, so the same seed would no longer "
                                              "give the same image.")
    reserve_mb: int = _setting(1024, help="GPU memory (MiB) the planner keeps free for the CUDA context, "
                                          "fragmentation and other processes.")
    prompt_cache_mb: int = _setting(256, help="Host RAM (MiB) for the prompt-embedding cache: a repeated prompt skips "
                                              "the text encoder (same pixels). 0 turns the cache off.")
    transformer_file: Path | None = _setting(None, metavar="PATH.gguf",
                                             help="A GGUF-quantized transformer (Q8_0, Q4_0, ...) to load instead of "
                                                  "the model folder's; the other components come from --model.")
    # Files
    outputs_dir: Path = _setting(Path("outputs"), help="Folder the generated PNGs are saved in.", metavar="DIR")
    data_dir: Path = _setting(default_factory=_default_data_dir, metavar="DIR",
                              help="Folder for the built demo model and other data the server makes.")
    # Web app
    host: str = _setting("127.0.0.1", help="Address to listen on. Anything but loopback exposes the service: "
                                           "set authentication.")
    port: int = _setting(7860, help="TCP port of the web app.")
    queue_size: int = _setting(8, help="Jobs that may wait for the GPU besides the one generating, counted over "
                                       "every front door; more are refused with a 'busy' answer.")
    auth: str = _setting("", secret=True, help="Login pairs 'user:password[,user:password]' (prefer --auth-file).",
                         metavar="PAIRS")
    auth_file: Path | None = _setting(None, help="File with one 'user:password' per line.", metavar="FILE")
    api_key: str = _setting("", metavar="KEY", secret=True,
                            help="Key of the OpenAI-compatible REST API (/v1): clients send 'Authorization: Bearer KEY'. "
                                 "Without it the REST API answers only on loopback, or behind --auth.")
    metrics_public: bool = _setting(False, help="Serve /metrics without sign-in, for a local Prometheus that cannot "
                                                "sign in (Basic auth also works); everything else stays protected.")
    shutdown_timeout_s: float = _setting(60.0, help="On SIGTERM, how long the running job may finish before it "
                                                    "is cancelled.")
    max_upload_mb: int = _setting(20, help="Largest input image accepted (image-to-image, inpainting), in MiB.")
    log_prompts: bool = _setting(False, help="Write prompt text into the logs (off: prompts are private).")

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def lora_folder(self) -> Path:
        """Where LoRA adapters are read from: ``lora_dir``, or ``<data_dir>/loras``."""
        return self.lora_dir if self.lora_dir is not None else Path(self.data_dir) / "loras"

    @property
    def controlnet_choice(self) -> str:
        """The ControlNet to load: "" for none, "demo", or a hub id / path (--demo alone means "demo")."""
        if self.controlnet == "none":
            return ""
        if self.demo and not self.controlnet:
            return "demo"
        return self.controlnet

    @property
    def model_source(self) -> str:
        """What the loader loads: 'demo' or the model id/path, for messages and metadata."""
        return "demo" if self.demo else self.model


#: Limits of Linux file systems (NAME_MAX, PATH_MAX), in bytes of the UTF-8 name.
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096


def path_length_problem(path: str) -> str | None:
    """Why ``path`` is longer than a file system allows (its words, for an error message), or None."""
    if len(path.encode("utf-8", "surrogatepass")) >= PATH_MAX_BYTES:
        return f"is longer than the {PATH_MAX_BYTES - 1} bytes a path may have"
    longest = max((len(part.encode("utf-8", "surrogatepass")) for part in path.split("/")), default=0)
    if longest > NAME_MAX_BYTES:
        return f"has a name of {longest} bytes, longer than the {NAME_MAX_BYTES} a file system allows"
    return None


def _validate(s: Settings) -> None:
    def choice(name: str, value: str, choices: Iterable[str]) -> None:
        if value not in choices:
            raise SettingsError(
                f"{name}={value!r} is not valid: use one of {', '.join(choices)} "
                f"(--{name.replace('_', '-')} or {ENV_PREFIX}{name.upper()})."
            )

    # Paths the file system would refuse to even look at (a name longer than it allows): said here, not as an
    # OSError from the first exists() somewhere later. The model is a path or a hub id: the same limits hold.
    for f in dataclasses.fields(Settings):
        value = getattr(s, f.name)
        if isinstance(value, Path) or f.name == "model":
            problem = path_length_problem(str(value))
            if problem:
                raise SettingsError(f"{f.name}={shown(str(value))} {problem} "
                                    f"(--{f.name.replace('_', '-')} or {ENV_PREFIX}{f.name.upper()}).")
    # Every setting declared with choices (the flags' argparse checks them too; the ZIMAGE_* variables only here).
    for f in dataclasses.fields(Settings):
        if f.metadata.get("choices") and isinstance(getattr(s, f.name), str):
            choice(f.name, getattr(s, f.name), f.metadata["choices"])
    if s.demo and s.controlnet not in ("", "demo", "none"):
        raise SettingsError(f"controlnet={s.controlnet!r} cannot be combined with --demo (the demo model's tiny "
                            "transformer fits only its own ControlNet): leave --controlnet out (or 'none'), or drop "
                            "--demo.")
    if s.controlnet == "demo" and not s.demo:
        raise SettingsError("controlnet='demo' is the demo model's ControlNet: use it with --demo, or give a "
                            "ControlNet's hub id or path.")
    choice("memory_profile", s.memory_profile, PROFILE_CHOICES)
    for option in s.memory_options:
        choice("memory_options", option, OPTION_CHOICES)
    if not (s.device in ("auto", "cpu", "cuda") or (s.device.startswith("cuda:") and s.device[5:].isdigit())):
        raise SettingsError(f"device={s.device!r} is not valid: use auto, cpu, cuda or cuda:N (e.g. cuda:1).")
    if s.dtype == "fp16" and s.device == "cpu":
        raise SettingsError("dtype='fp16' on device='cpu' is 60-120x slower than bf16 on a CPU: use --dtype bf16 "
                            "or fp32 (or --dtype auto).")
    if not s.model.strip():
        raise SettingsError("model='' is empty: give a hub id such as Tongyi-MAI/Z-Image-Turbo, a local folder, "
                            "or use --demo.")
    if not 0 <= s.reserve_mb <= 1024 * 1024:
        raise SettingsError(f"reserve_mb={s.reserve_mb} is out of range: use 0 to 1048576 MiB (default 1024).")
    if not 0 <= s.prompt_cache_mb <= 1024 * 1024:
        raise SettingsError(f"prompt_cache_mb={s.prompt_cache_mb} is out of range: use 0 (off) to 1048576 MiB "
                            "(default 256; --prompt-cache-mb or ZIMAGE_PROMPT_CACHE_MB).")
    if s.transformer_file is not None and Path(s.transformer_file).suffix.lower() != ".gguf":
        raise SettingsError(f"transformer_file={str(s.transformer_file)!r} is not a .gguf file: give a GGUF "
                            "transformer (e.g. z_image_turbo-Q8_0.gguf), or leave --transformer-file out.")
    if not 1 <= s.port <= 65535:
        raise SettingsError(f"port={s.port} is out of range: use 1 to 65535 (default 7860).")
    if not 1 <= s.queue_size <= 1000:
        raise SettingsError(f"queue_size={s.queue_size} is out of range: use 1 to 1000 (default 8).")
    if not 1 <= s.max_upload_mb <= 200:
        raise SettingsError(f"max_upload_mb={s.max_upload_mb} is out of range: use 1 to 200 MiB (default 20).")
    if not 0 < s.shutdown_timeout_s <= 3600:
        raise SettingsError(f"shutdown_timeout_s={s.shutdown_timeout_s} is out of range: use more than 0 and at "
                            "most 3600 seconds.")
    for pair in _split_list(s.auth):
        if ":" not in pair or not pair.split(":", 1)[0] or not pair.split(":", 1)[1]:
            raise SettingsError("auth has an entry that is not 'user:password': write pairs as "
                                "user:password,user2:password2 (or use --auth-file).")


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _field_type(f: dataclasses.Field) -> str:
    # Annotations are strings under `from __future__ import annotations`.
    return str(f.type)


def _convert(f: dataclasses.Field, raw: str, origin: str) -> Any:
    """Turn a string from the environment or argv into the field's type."""
    kind = _field_type(f)
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).expanduser()
        if kind == "Path | None":
            return Path(raw).expanduser() if raw.strip() else None
        if kind == "tuple[str, ...]":
            return tuple(_split_list(raw))
        return raw
    except ValueError:
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}.get(kind, kind)
        raise SettingsError(f"{origin}={raw!r} is not valid: expected {expected}.") from None


def env_name(field_name: str) -> str:
    """The environment variable that sets a field, e.g. ``ZIMAGE_QUEUE_SIZE``."""
    return ENV_PREFIX + field_name.upper()


def add_settings_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add one option per setting (all, or those in ``names``) to ``parser``.

    Options default to ``None`` so that :func:`settings_from_args` can tell "not given" from a value.
    """
    wanted = set(names) if names is not None else None
    group = parser.add_argument_group("settings (each also as a ZIMAGE_* environment variable)")
    for f in dataclasses.fields(Settings):
        if wanted is not None and f.name not in wanted:
            continue
        flag = "--" + f.name.replace("_", "-")
        # argparse formats help with %: a literal percent sign in a help text must be doubled.
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]".replace("%", "%%")
        if _field_type(f) == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, type=str, choices=f.metadata["choices"],
                               metavar=f.metadata["metavar"], help=help_text)


def settings_from_args(args: argparse.Namespace | None = None,
                       environ: Mapping[str, str] | None = None,
                       **overrides: Any) -> Settings:
    """Build :class:`Settings`: explicit ``overrides`` > command-line flags > ``ZIMAGE_*`` env > defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        given = getattr(args, f.name, None) if args is not None else None
        if given is not None:
            values[f.name] = given if isinstance(given, bool) else _convert(f, given, "--" + f.name.replace("_", "-"))
        elif env_name(f.name) in environ:
            values[f.name] = _convert(f, environ[env_name(f.name)], env_name(f.name))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Settings(**values)


def read_auth_pairs(settings: Settings) -> list[tuple[str, str]]:
    """The (user, password) pairs from ``auth`` and ``auth_file``; empty when authentication is off."""
    pairs = _split_list(settings.auth)
    if settings.auth_file is not None:
        try:
            lines = settings.auth_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"auth_file={str(settings.auth_file)!r} cannot be read ({exc.strerror}): "
                                "check the path and its permissions.") from None
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if ":" not in line or not line.split(":", 1)[0] or not line.split(":", 1)[1]:
                raise SettingsError(f"auth_file line {number} is not 'user:password': fix or remove that line.")
            pairs.append(line)
    return [tuple(pair.split(":", 1)) for pair in pairs]  # type: ignore[misc]

"""LoRA adapters: the folder of files, which of them fit this model, and switching them on per request.

A request names up to :data:`MAX_LORAS` adapters from the LoRA folder (``settings.lora_folder``), each with a
weight in [:data:`MIN_WEIGHT`, :data:`MAX_WEIGHT`]. Only ``.safetensors`` files are read: a pickle (``.pt``,
``.ckpt``, ``.bin``, ``.pth``) can run code when it is loaded, so it is listed but refused.

Pure parts (no torch, testable as tables): reading a safetensors header, the key format of a file
(:func:`detect_format`), which other model a foreign LoRA was made for (:func:`foreign_model`), whether its layers
and shapes fit this transformer (:func:`fit_problem`), parsing ``NAME[:WEIGHT]`` (:func:`parse_lora_arg`),
request validation (:func:`validate_loras`), which memory placements cannot take an adapter
(:func:`placement_problem`) and the cache policy (:class:`AdapterCache`).

Adapter parts (torch and diffusers imported inside the functions): the transformer's layer table, built on the
meta device (:func:`transformer_modules`); the key conversion, done by diffusers' own
``ZImagePipeline.lora_state_dict`` on shape-only tensors so that no weight is read (:func:`converted_shapes`);
:class:`LoraFolder`, which lists and inspects files; and :class:`LoraAdapters`, which loads adapters into the
pipeline once (``load_lora_weights``), keeps up to :data:`CACHE_SIZE` of them (``delete_adapters`` evicts the least
recently used), switches a request's set on (``enable_lora`` + ``set_adapters``) and off again afterwards
(``disable_lora``), so a request without LoRAs computes exactly what a pipeline that never loaded one computes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import LoraError
from .errors import first_line as _first_line
from .errors import shown as _shown

log = logging.getLogger("zimage.lora")


class LoraLoadFailed(LoraError):
    """``load_lora_weights`` itself failed. Under model or sequential offload diffusers removes the offload hooks
    for the load and puts them back only after a success, so the caller reloads the pipeline."""


#: Adapters one request may stack.
MAX_LORAS = 4
#: Allowed adapter weights: 1 is the adapter's trained strength, 0 switches it off, negative inverts it.
MIN_WEIGHT, MAX_WEIGHT = -2.0, 2.0
DEFAULT_WEIGHT = 1.0
#: Adapters kept loaded in the pipeline (least recently used evicted first). Each is small next to the model
#: (a rank-32 LoRA of the full transformer is about 150 MB in bf16), and loading one costs a read of its file.
CACHE_SIZE = 8
SAFETENSORS_SUFFIX = ".safetensors"
#: Pickle formats: listed (so an operator sees why they are not offered) and always refused.
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
#: The safetensors library refuses headers beyond 100 MB; so does this reader.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NAME_CHARS = 200
#: Key formats :func:`detect_format` tells apart (all but "pickle" and "invalid" are safetensors files).
FORMATS = ("peft", "comfyui", "kohya", "lokr", "unknown", "pickle", "invalid")
DEMO_LORA_FORMATS = ("peft", "comfyui", "kohya")
DEMO_LORA_RANK = 4

#: (modification time in ns, size in bytes) of a file: a cached adapter whose file has another stamp is reloaded.
Stamp = tuple[int, int]
#: Linear layer name -> (in_features, out_features); None for a module that is not a linear layer.
ModuleTable = Mapping[str, "tuple[int, int] | None"]


# --- Request values ------------------------------------------------------------------------------

def parse_lora_arg(text: str) -> tuple[str, float]:
    """``"NAME"`` or ``"NAME:WEIGHT"`` (the command line's ``--lora``) -> (name, weight); weight defaults to 1.

    The weight is any finite number here; its range is checked with the request (:func:`validate_loras`).
    Raises ``ValueError`` with a message naming the text and the expected form.
    """
    name, weight_text = (text.rsplit(":", 1) if ":" in text else (text, None))
    name = name.strip()
    if not name:
        raise ValueError(f"{text!r} has no LoRA name: write NAME or NAME:WEIGHT, e.g. my-style:0.8.")
    if weight_text is None:
        return name, DEFAULT_WEIGHT
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"{text!r}: the weight after ':' must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, "
                         "e.g. my-style:0.8.") from None
    if not math.isfinite(weight):
        raise ValueError(f"{text!r}: the weight must be a finite number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}.")
    return name, weight


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file stem in the LoRA folder (a path, a hidden file, too long), or None."""
    if not name.strip():
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    if any(char in name for char in "/\\\x00") or name.startswith(".") or any(ord(c) < 32 for c in name):
        return "is not a plain file name (no '/', '\\', control characters or leading '.')"
    return None


def loras_from_request(value: Any) -> tuple[tuple[Any, Any], ...]:
    """The ``loras`` field as the REST API and the Gradio API receive it (JSON) -> (name, weight) pairs.

    Empty (None, ``""``, ``[]``) is no adapter; otherwise a list of ``{"name": "NAME", "weight": 0.8}`` objects
    (the weight is 1.0 when left out) or ``["NAME", 0.8]`` pairs. Only the shape is checked here; names and weights
    are checked by :func:`validate_loras` with the request. Raises :class:`LoraError` (``param`` "loras").
    """
    if value is None or value == "" or value == []:
        return ()
    names = "names: `python -m zimage loras`"
    if not isinstance(value, list):
        raise LoraError(f'loras={_shown(value)} is not valid: send a list, e.g. [{{"name": "NAME", "weight": 0.8}}] '
                        f'or [["NAME", 0.8]] ({names}).')
    parsed = []
    for index, item in enumerate(value):
        if isinstance(item, dict) and "name" in item and set(item) <= {"name", "weight"}:
            parsed.append((item["name"], item.get("weight", DEFAULT_WEIGHT)))
        elif isinstance(item, list) and len(item) == 2:
            parsed.append((item[0], item[1]))
        else:
            raise LoraError(f"loras[{index}]={_shown(item)} is not valid: write each adapter as "
                            f'{{"name": "NAME", "weight": 0.8}} or ["NAME", 0.8] ({names}).')
    return tuple(parsed)


def validate_loras(value: Any) -> tuple[tuple[str, float], ...]:
    """Check a request's ``loras``: a tuple (or list) of at most :data:`MAX_LORAS` (name, weight) pairs.

    Types are refused, never coerced: a weight must be an int or float (not a bool, not a string), finite and in
    [-2, 2]; a name must be text and a plain file name; each name appears once. Returns the pairs as a tuple of
    (str, float). Raises :class:`LoraError` (a ValidationError) naming the value and what is allowed. Whether the names exist
    in the LoRA folder is checked when the job is submitted (:meth:`LoraFolder.check`).
    """
    if not isinstance(value, (tuple, list)):
        raise LoraError(f"loras={_shown(value)} must be a list of (name, weight) pairs, at most {MAX_LORAS}.")
    if len(value) > MAX_LORAS:
        raise LoraError(f"loras has {len(value)} adapters: at most {MAX_LORAS} per request.")
    checked: list[tuple[str, float]] = []
    for index, entry in enumerate(value):
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise LoraError(f"loras[{index}]={_shown(entry)} must be a (name, weight) pair, e.g. "
                                  "('my-style', 0.8).")
        name, weight = entry
        if not isinstance(name, str):
            raise LoraError(f"LoRA name {_shown(name)} must be text: the file's name in the LoRA folder "
                                  "without .safetensors.")
        problem = name_problem(name)
        if problem:
            raise LoraError(f"LoRA name {_shown(name)} {problem}: use the file's name in the LoRA folder "
                                  "without .safetensors.")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise LoraError(f"LoRA weight {_shown(weight)} for {name!r} must be a number from {MIN_WEIGHT:g} "
                                  f"to {MAX_WEIGHT:g} (1 is the adapter's full strength, 0 switches it off).")
        # A whole number is compared as it is: float() of a 400-digit JSON integer would overflow.
        if not ((isinstance(weight, int) or math.isfinite(weight)) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
            raise LoraError(f"LoRA weight {_shown(weight)} for {name!r} is out of range: use a number from "
                                  f"{MIN_WEIGHT:g} to {MAX_WEIGHT:g} (1 is the adapter's full strength).")
        if any(name == seen for seen, _ in checked):
            raise LoraError(f"LoRA {name!r} is listed twice: give each adapter once, with one weight.")
        checked.append((name, float(weight)))
    return tuple(checked)


def unknown_name_message(name: str, available: Sequence[str], limit_chars: int = 300) -> str:
    """The error for a name that is not in the folder, listing the available names (cut to ``limit_chars``)."""
    if not available:
        return (f"LoRA {name!r} is not in the LoRA folder, which has no usable .safetensors files: put LoRA files "
                "there (--lora-dir, ZIMAGE_LORA_DIR) or send the request without it.")
    shown: list[str] = []
    for candidate in available:
        if sum(len(item) + 2 for item in shown) + len(candidate) > limit_chars:
            break
        shown.append(candidate)
    more = len(available) - len(shown)
    listing = ", ".join(shown) + (f" (and {more} more)" if more else "")
    hint = " (give the name without .safetensors)" if name.endswith(SAFETENSORS_SUFFIX) else ""
    return f"LoRA {name!r} is not in the LoRA folder{hint}: available are {listing}."


def placement_problem(plan: Any) -> str | None:
    """Why a LoRA cannot be used on ``plan`` (a :class:`~zimage.planner.MemoryPlan`), with the fix; or None.

    Established on diffusers 0.42.1 and peft 0.21.2 (README, "LoRA adapters"): fp8 weight storage
    (``enable_layerwise_casting``) breaks an adapter loaded after it, since peft casts the adapter to the base
    layer's float8 dtype and its matmul then fails ("not implemented for 'Float8_e4m3fn'"); diffusers supports
    only adapters loaded *before* the casting is enabled, which a cache that loads per request cannot do.
    Model and sequential offload are put back by diffusers after a load with a call that needs a GPU.
    """
    if "fp8-storage" in plan.options:
        return (f"LoRA adapters cannot be used on the memory placement {plan.describe()}: with fp8 weight storage "
                "diffusers 0.42.1 stores a LoRA loaded later in float8 too and its layers fail. Restart the server "
                "without fp8 storage (--no-auto-fp8 or ZIMAGE_AUTO_FP8=0, no fp8-storage in --memory-options, "
                "--recovery-fp8 off) to use LoRAs, or send the request without LoRAs.")
    if "fp8-compute" in plan.options:
        return (f"LoRA adapters cannot be used on the memory placement {plan.describe()}: its transformer's linear "
                "layers are torchao float8 tensors, which this project has not checked peft's adapters on. Restart "
                "the server without fp8-compute in --memory-options to use LoRAs, or send the request without "
                "LoRAs.")
    if plan.profile in ("model-offload", "sequential-offload") and str(plan.device) == "cpu":
        return (f"LoRA adapters cannot be used with {plan.profile} on the CPU: diffusers puts the offload back after "
                "loading an adapter only on a GPU. Use --memory-profile cpu (or auto).")
    return None


# --- Files: headers, formats, foreign models, fit ------------------------------------------------------

@dataclass(frozen=True)
class SafetensorsHeader:
    """What a .safetensors header says: tensor name -> (dtype, shape), and the free-form string metadata."""

    tensors: Mapping[str, tuple[str, tuple[int, ...]]]
    metadata: Mapping[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of a .safetensors file (8-byte little-endian length + JSON), no tensor data.

    Raises ``ValueError`` saying why the file is not a usable safetensors file (too short, an implausible header
    length, not JSON, tensors that run past the end of the file: a truncated download).
    """
    size_bytes = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"it is {size_bytes} bytes long, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size_bytes - 8 or length < 2:
            raise ValueError("it is not a safetensors file (its first 8 bytes are not a plausible header length)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("it is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("it is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_bytes = size_bytes - 8 - length
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            valid = all(size >= 0 for size in shape) and isinstance(start, int) and isinstance(end, int)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"it is not a safetensors file (the header entry {_shown(key)} is malformed)")
        if not 0 <= start <= end <= data_bytes:
            raise ValueError(f"it is truncated: tensor {_shown(key)} runs past the end of the file (an incomplete "
                             "download?)")
        tensors[key] = (str(dtype), shape)
    return SafetensorsHeader(tensors=tensors, metadata=metadata if isinstance(metadata, dict) else {})


def detect_format(keys: Iterable[str]) -> str:
    """The key format of a LoRA file: "peft" (diffusers/PEFT: ``transformer.<layer>.lora_A.weight``), "comfyui"
    (ComfyUI, ai-toolkit, musubi: ``diffusion_model.`` prefix), "kohya" (``lora_unet_<layer_with_underscores>``
    with ``lora_down``/``lora_up``/``alpha``), "lokr" (``lokr_w1``...) or "unknown"."""
    keys = list(keys)
    if any(".lokr_" in key for key in keys):
        return "lokr"
    if any(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        return "kohya"
    if any(key.startswith("diffusion_model.") for key in keys):
        return "comfyui"
    if any(key.startswith("transformer.") for key in keys):
        return "peft"
    return "unknown"


_SD_UNET = re.compile(r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d*")
# SDXL has a second text encoder, an extra embedding and up to 10 transformer blocks per attention (SD 1.x has 1).
_SDXL_HINTS = re.compile(r"lora_te[12]_|text_encoder_2|(?:^|[._])(?:add_embedding|label_emb)[._]|"
                         r"(?:down_blocks|up_blocks|input_blocks|output_blocks)[._]\d+[._](?:attentions[._])?\d+[._]"
                         r"transformer_blocks[._][1-9]")
_SD1_HINTS = re.compile(r"^lora_te_|^text_encoder\.")
_WAN = re.compile(r"(?:^|\.|lora_unet_)blocks[._]\d+[._](?:self_attn|cross_attn|attn1|attn2)[._]")
_ZIMAGE = re.compile(r"(?:^|[._])(?:layers|noise_refiner|context_refiner)[._]\d+[._]"
                     r"(?:attention|feed_forward|adaln_modulation)[._]")
_LANGUAGE_MODEL = re.compile(r"self_attn[._][qkvo]_proj|mlp[._](?:gate|up|down)_proj")


def foreign_model(keys: Iterable[str]) -> str | None:
    """Which other model family a LoRA's keys were made for, from their layer names; None when they do not
    look foreign (Z-Image's layers are ``layers.N``, ``noise_refiner``, ``context_refiner`` with ``attention``
    and ``feed_forward``).

    Recognised: Stable Diffusion UNets (SDXL told apart from SD 1.x/2.x by its second text encoder or deeper
    transformer blocks), a Stable Diffusion text encoder alone, HunyuanVideo (token refiner), Flux (double and
    single blocks), Qwen-Image (img/txt modulation and MLPs), Wan (``blocks.N.self_attn``/``cross_attn``), SD3
    (joint blocks), other MM-DiTs (``add_q_proj``, ``ff_context``), other ``transformer_blocks`` DiTs, and
    language models (``q_proj``, ``gate_proj``).
    """
    lowered = [key.lower() for key in keys]
    if not lowered or any(_ZIMAGE.search(key) for key in lowered):
        return None  # Z-Image's own layer names: whether they fit is fit_problem's question

    def has(*needles: str) -> bool:
        return any(needle in key for key in lowered for needle in needles)

    if any(_SD_UNET.search(key) for key in lowered):
        if any(_SDXL_HINTS.search(key) for key in lowered):
            return "SDXL (a Stable Diffusion UNet)"
        if any(_SD1_HINTS.search(key) for key in lowered):
            return "Stable Diffusion 1.x/2.x (a UNet)"
        return "Stable Diffusion 1.x/2.x or SDXL (a UNet)"
    if all(key.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder")) for key in lowered):
        return "the text encoder of Stable Diffusion (CLIP)"
    if has("token_refiner"):
        return "HunyuanVideo"
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "Flux"
    if has("transformer_blocks") and has("img_mod", "txt_mod", "img_mlp", "txt_mlp"):
        return "Qwen-Image"
    if any(_WAN.search(key) for key in lowered):
        return "Wan (video)"
    if has("joint_blocks", "context_block", "x_block"):
        return "Stable Diffusion 3"
    if has("add_q_proj", "add_k_proj", "ff_context"):
        return "an MM-DiT such as SD3 or Flux"
    if has("transformer_blocks"):
        return "another diffusion transformer (its layers are 'transformer_blocks'; Z-Image's are 'layers')"
    if any(_LANGUAGE_MODEL.search(key) for key in lowered):
        return "a language model (q_proj/gate_proj layers), not an image transformer"
    return None


_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_[A-Za-z_]+|lokr_[A-Za-z0-9_]+)(?:\.(?P<tensor>weight|bias))?$")


def fit_problem(converted: Mapping[str, tuple[int, ...]], modules: ModuleTable) -> str | None:
    """Why LoRA keys in diffusers' form (``transformer.<layer>.lora_A.weight`` -> shape) do not fit the
    transformer whose layers are ``modules``; None when every key changes an existing linear layer with matching
    in/out features. ``load_lora_weights`` keeps only ``transformer.`` keys and would skip the others silently,
    so they count as not fitting: a partly applied LoRA is not what its author made.
    """
    if not converted:
        return "it has no LoRA weights"
    not_lora = [key for key in converted if "lora" not in key and "lokr" not in key]
    if not_lora:  # the same test load_lora_weights makes ("Invalid adapter checkpoint")
        return (f"it is not a LoRA: {len(not_lora)} of its tensors, e.g. {_shown(not_lora[0])}, are not LoRA weights "
                "(a full model checkpoint, or another kind of adapter?)")
    other = [key for key in converted if not key.startswith("transformer.")]
    if other:
        return (f"{len(other)} of its keys, e.g. {_shown(other[0])}, are not for the transformer (a text-encoder "
                "LoRA?); Z-Image loads LoRAs into its transformer only")
    missing: list[str] = []
    mismatched: list[str] = []
    for key, shape in converted.items():
        match = _LORA_KEY.match(key[len("transformer."):])
        if match is None:
            missing.append(key)
            continue
        module = match["module"]
        if module not in modules:
            missing.append(module)
            continue
        features = modules[module]
        if features is None:
            mismatched.append(f"{module!r} is not a linear layer here")
        elif match["tensor"] == "weight" and len(shape) == 2:
            in_features, out_features = features
            if match["part"] == "lora_A" and shape[1] != in_features:
                mismatched.append(f"{module!r} takes {in_features} features here and {shape[1]} in the file")
            elif match["part"] == "lora_B" and shape[0] != out_features:
                mismatched.append(f"{module!r} gives {out_features} features here and {shape[0]} in the file")
    if mismatched:
        return (f"it was made for a Z-Image transformer of another size ({mismatched[0]}; e.g. a LoRA of the full "
                "model on the demo model, or the other way round)")
    if missing:
        unique = sorted(set(missing))
        return (f"its keys do not match this model's transformer: {len(unique)} layer(s) it changes do not exist "
                f"here, e.g. {_shown(unique[0])}")
    return None


# --- Files: the adapter parts (torch, diffusers) ------------------------------------------------------

def transformer_config_for(settings: Any) -> dict[str, Any]:
    """The transformer config a LoRA (or a GGUF transformer file) is checked against before the model is loaded:
    see :func:`transformer_config_origin`."""
    return transformer_config_origin(settings)[0]


def transformer_config_origin(settings: Any) -> tuple[dict[str, Any], str]:
    """The transformer config of ``settings``' model before it is loaded, and where it came from: ``"demo"`` (the
    demo architecture), ``"folder"`` (a local or cached folder's ``transformer/config.json``) or ``"published"``
    (Z-Image-Turbo's published config; the base model has the same architecture). Never downloads."""
    from .architecture import PUBLISHED, TINY

    if settings.demo:
        return dict(TINY.transformer), "demo"
    from .model_files import find_local_model_folder

    folder = find_local_model_folder(settings.model)
    config = folder / "transformer" / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        return json.loads(config.read_text(encoding="utf-8")), "folder"
    return dict(PUBLISHED.transformer), "published"


def transformer_modules(config: Mapping[str, Any]) -> dict[str, tuple[int, int] | None]:
    """The layers of a ``ZImageTransformer2DModel`` built from ``config`` on the meta device (no memory, no
    weights; 0.2 s for the full-size model): name -> (in_features, out_features), None for non-linear modules."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(dict(config))
    return {name: (module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else None
            for name, module in model.named_modules() if name}


def converted_shapes(header: SafetensorsHeader) -> dict[str, tuple[int, ...]]:
    """The keys and shapes ``load_lora_weights`` would load, converted by diffusers' own
    ``ZImagePipeline.lora_state_dict`` (PEFT, ComfyUI/ai-toolkit ``diffusion_model.``, Kohya ``lora_unet_`` with
    alpha) on shape-only meta tensors, so no weight is read. Raises ``ValueError`` when diffusers cannot convert them.
    """
    import torch
    from diffusers import ZImagePipeline

    fake: dict[str, Any] = {}
    for key, (_dtype, shape) in header.tensors.items():
        # The conversion reads alpha values (alpha / rank scales the weights); any value keeps the shapes. A real
        # scalar whatever the header claims: a declared shape must never decide how much memory is allocated.
        fake[key] = torch.ones(()) if key.endswith(".alpha") else torch.empty(shape, device="meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = ZImagePipeline.lora_state_dict(fake)
    except Exception as exc:  # noqa: BLE001 - any conversion failure means "does not fit", said in words
        lines = str(exc).strip().splitlines()
        raise ValueError(f"diffusers cannot convert its keys ({type(exc).__name__}: "
                         f"{(lines[0] if lines else '')[:160]})") from None
    return {key: tuple(value.shape) for key, value in state.items()}


@dataclass(frozen=True)
class LoraFile:
    """One file of the LoRA folder as listed: ``name`` is the file stem (what requests use)."""

    name: str
    path: Path
    size_bytes: int
    format: str  # one of FORMATS
    fits: bool
    problem: str | None  # why it cannot be used here (None when it fits)
    stamp: Stamp

    def info(self) -> dict[str, Any]:
        """JSON-ready: {"name", "size_bytes", "fits", "problem", "format"}."""
        return {"name": self.name, "size_bytes": self.size_bytes, "fits": self.fits, "problem": self.problem,
                "format": self.format}

    def error(self) -> LoraError:
        """The error a request naming this file gets (only for a file that does not fit)."""
        return LoraError(f"LoRA {self.name!r} ({self.path.name}) cannot be used: {self.problem}.")


def file_stamp(path: Path) -> Stamp:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def inspect_file(path: Path, modules: ModuleTable) -> LoraFile:
    """Read ``path``'s header (never its weights) and decide whether it fits the transformer of ``modules``."""
    stamp = file_stamp(path)
    name = path.stem

    def result(fmt: str, problem: str | None) -> LoraFile:
        return LoraFile(name, path, stamp[1], fmt, problem is None, problem, stamp)

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return result("pickle", f"it is a pickle file ({path.suffix}), which can run code when loaded; only "
                                ".safetensors LoRAs are accepted: convert it (e.g. with safetensors' convert "
                                "tools) or get the .safetensors version")
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        return result("invalid", str(exc) if isinstance(exc, ValueError) else f"it cannot be read ({exc.strerror})")
    keys = list(header.tensors)
    fmt = detect_format(keys)
    foreign = foreign_model(keys)
    if foreign is not None:
        return result(fmt, f"it was made for {foreign}, not for Z-Image")
    if any(key.startswith(("lora_te", "text_encoder.")) for key in keys):
        return result(fmt, "it also changes the text encoder (lora_te/text_encoder keys); Z-Image loads LoRAs into "
                           "its transformer only")
    try:
        converted = converted_shapes(header)
    except ValueError as exc:
        return result(fmt, f"its keys do not match this model's transformer: {exc}")
    return result(fmt, fit_problem(converted, modules))


def folder_files(folder: Path) -> list[Path]:
    """The LoRA files directly in ``folder`` (.safetensors and pickles; hidden files skipped), sorted by name;
    empty when the folder does not exist."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # e.g. no permission: the listing is empty, and the log says why
        log.warning("the LoRA folder %s cannot be read (%s): no LoRA is offered", folder, exc.strerror)
        return []
    suffixes = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
    return sorted((path for path in entries if path.suffix.lower() in suffixes and not path.name.startswith(".")
                   and path.is_file()), key=lambda path: (path.stem, path.suffix))


class LoraFolder:
    """The LoRA folder: lists and inspects its files, each inspection kept until the file (or the layer table)
    changes. Safe to call from any thread.

    ``modules`` returns the transformer's layer table (:func:`transformer_modules`) to judge the files against.
    """

    def __init__(self, folder: Path, modules: Callable[[], ModuleTable]) -> None:
        self.folder = Path(folder)
        self._modules = modules
        self._lock = threading.Lock()
        self._inspected: dict[Path, tuple[Stamp, int, LoraFile]] = {}

    def list(self) -> list[LoraFile]:
        """Every LoRA file in the folder, sorted by name (pickles and broken files too, with ``fits`` False)."""
        files = []
        for path in folder_files(self.folder):
            try:
                files.append(self._inspect(path))
            except FileNotFoundError:  # deleted while listing
                continue
        return files

    def check(self, loras: Sequence[tuple[str, float]]) -> list[LoraFile]:
        """The files for a validated request's (name, weight) pairs. Raises :class:`LoraError` for a name that is
        not in the folder (listing the usable ones), a pickle, or a file that does not fit. Inspects only the
        named files (a folder of hundreds of LoRAs costs one directory listing), all of them for the error."""
        if not loras:
            return []
        by_name: dict[str, Path] = {}
        for path in folder_files(self.folder):  # a .safetensors file wins over a pickle of the same name
            if path.stem not in by_name or path.suffix.lower() == SAFETENSORS_SUFFIX:
                by_name[path.stem] = path
        found = []
        for name, _weight in loras:
            try:
                item = self._inspect(by_name[name]) if name in by_name else None
            except FileNotFoundError:  # deleted just now
                item = None
            if item is None:
                usable = sorted(entry.name for entry in self.list() if entry.fits)
                raise LoraError(unknown_name_message(name, usable))
            if not item.fits:
                raise item.error()
            found.append(item)
        return found

    def _inspect(self, path: Path) -> LoraFile:
        stamp = file_stamp(path)
        modules = self._modules()
        with self._lock:
            cached = self._inspected.get(path)
        if cached is not None and cached[0] == stamp and cached[1] == id(modules):
            return cached[2]
        inspected = inspect_file(path, modules)
        with self._lock:
            if len(self._inspected) > 1024:  # a folder churning through many files: start over
                self._inspected.clear()
            self._inspected[path] = (inspected.stamp, id(modules), inspected)
        return inspected


# --- The cache policy (pure) ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CachedAdapter:
    """An adapter loaded in the pipeline: the LoRA name, diffusers' adapter name, the file's stamp and SHA-256."""

    name: str
    adapter_name: str
    stamp: Stamp
    sha256: str


@dataclass(frozen=True)
class CachePlan:
    """What to do before a request: delete these LoRA names' adapters (stale or least recently used), then load
    these names."""

    evict: tuple[str, ...]
    load: tuple[str, ...]


class AdapterCache:
    """Which adapters are loaded, least recently used first, at most ``capacity`` (>= :data:`MAX_LORAS`)."""

    def __init__(self, capacity: int = CACHE_SIZE) -> None:
        if capacity < MAX_LORAS:
            raise ValueError(f"capacity={capacity} must be at least {MAX_LORAS}: one request may use {MAX_LORAS}.")
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()

    def plan(self, wanted: Sequence[tuple[str, Stamp]]) -> CachePlan:
        """Evict and load so that every (name, stamp) of ``wanted`` is loaded with that stamp, within capacity.

        A name cached with another stamp (its file changed on disk) is evicted and loaded again; when the new
        ones do not fit, the least recently used names not in ``wanted`` go. Changes nothing itself.
        """
        wanted_names = {name for name, _ in wanted}
        stale = [name for name, stamp in wanted if name in self._entries and self._entries[name].stamp != stamp]
        load = [name for name, _ in wanted if name not in self._entries or name in stale]
        overflow = len(self._entries) - len(stale) + len(load) - self.capacity
        unused = [name for name in self._entries if name not in wanted_names]  # oldest first
        return CachePlan(evict=tuple(stale + unused[:max(0, overflow)]), load=tuple(load))

    def get(self, name: str) -> CachedAdapter | None:
        return self._entries.get(name)

    def add(self, entry: CachedAdapter) -> None:
        self._entries[entry.name] = entry
        self._entries.move_to_end(entry.name)

    def remove(self, name: str) -> CachedAdapter | None:
        return self._entries.pop(name, None)

    def touch(self, names: Iterable[str]) -> None:
        """Mark ``names`` as the most recently used, in this order."""
        for name in names:
            if name in self._entries:
                self._entries.move_to_end(name)

    def names(self) -> list[str]:
        """Loaded LoRA names, least recently used first."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()


# --- Switching adapters on the pipeline (adapter) ---------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoraAdapters:
    """The adapters loaded in one pipeline, used only from the GPU worker thread.

    :meth:`activate` before a request that uses LoRAs, :meth:`deactivate` after every request that activated,
    :meth:`reset` when the pipeline is replaced (the new one has no adapters).
    """

    def __init__(self, capacity: int = CACHE_SIZE) -> None:
        self.cache = AdapterCache(capacity)
        self._pipe_ref: Any = None
        self._active = False
        self._counter = 0

    def reset(self) -> None:
        """Forget every adapter: the pipeline was dropped or replaced."""
        self.cache.clear()
        self._pipe_ref = None
        self._active = False

    def loaded(self) -> list[str]:
        """LoRA names loaded now, least recently used first."""
        return self.cache.names()

    def activate(self, pipe: Any, files: Sequence[tuple[LoraFile, float]],
                 on_loading: Callable[[str], None] | None = None) -> tuple[dict[str, Any], ...]:
        """Load what is missing or changed (evicting as :class:`AdapterCache` says) and switch on exactly
        ``files`` with their weights. Returns [{"name", "weight", "sha256"}] for the metadata.

        Raises :class:`LoraError` naming the file when a file vanished or diffusers fails to load or set it.
        """
        if self._pipe_ref is None or self._pipe_ref() is not pipe:
            self.reset()
            self._pipe_ref = weakref.ref(pipe)
        wanted = []
        for item, _weight in files:
            try:
                wanted.append((item.name, file_stamp(item.path)))
            except OSError:
                raise LoraError(f"LoRA {item.name!r} ({item.path.name}) is no longer in the LoRA folder.") from None
        plan = self.cache.plan(wanted)
        evicted = [entry.adapter_name for entry in map(self.cache.remove, plan.evict) if entry is not None]
        if evicted:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")  # expected
                pipe.delete_adapters(evicted)
        stamps = dict(wanted)
        for name in plan.load:
            item = next(item for item, _ in files if item.name == name)
            if on_loading is not None:
                on_loading(name)
            self.cache.add(self._load(pipe, item, stamps[name]))
        self.cache.touch(name for name, _ in wanted)
        entries = [self.cache.get(item.name) for item, _ in files]
        try:
            pipe.enable_lora()
            pipe.set_adapters([entry.adapter_name for entry in entries], adapter_weights=[w for _, w in files])
        except Exception as exc:  # noqa: BLE001 - said in words; the adapters stay loaded for the next request
            self.deactivate(pipe, force=True)
            raise LoraError(f"LoRA adapters {', '.join(repr(item.name) for item, _ in files)} could not be switched "
                            f"on: {type(exc).__name__}: {_first_line(exc)}") from None
        self._active = True
        return tuple({"name": item.name, "weight": weight, "sha256": entry.sha256}
                     for (item, weight), entry in zip(files, entries))

    def unload(self, pipe: Any) -> None:
        """Take every adapter out of the pipeline (diffusers' ``unload_lora_weights``: peft's layers give the original
        ones back) and forget them; a later request loads its files again. For a compiled transformer, whose graph
        is that of the original layers."""
        if pipe is not None and self.cache.names():
            pipe.unload_lora_weights()
        self.reset()

    def deactivate(self, pipe: Any, force: bool = False) -> None:
        """Switch every adapter off (``disable_lora``): the next request computes as if none was ever loaded."""
        if (self._active or force) and pipe is not None and self.cache.names():
            pipe.disable_lora()
        self._active = False

    def _load(self, pipe: Any, item: LoraFile, stamp: Stamp) -> CachedAdapter:
        sha256 = file_sha256(item.path)
        self._counter += 1
        adapter_name = f"zimage_lora_{self._counter}"  # unique: a reloaded file never clashes with its old adapter
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first that the model "already has a peft_config": expected.
                warnings.filterwarnings("ignore", message=".*peft_config.*")
                pipe.load_lora_weights(str(item.path), adapter_name=adapter_name)
        except Exception as exc:  # noqa: BLE001 - any failure is this file's: said in words, never a traceback
            if adapter_name in _loaded_adapter_names(pipe):
                pipe.delete_adapters([adapter_name])
            raise LoraLoadFailed(f"LoRA {item.name!r} ({item.path.name}) could not be loaded: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from None
        return CachedAdapter(item.name, adapter_name, stamp, sha256)


def _loaded_adapter_names(pipe: Any) -> set[str]:
    try:
        return {name for names in pipe.get_list_adapters().values() for name in names}
    except Exception:  # noqa: BLE001 - no adapter was ever loaded (no peft config yet)
        return set()



# --- Demo LoRAs (for tests, the benchmark and trying the feature without a real LoRA) ---------------------

_DEMO_TARGETS = re.compile(r"\.(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])$")


def demo_lora_tensors(modules: ModuleTable, fmt: str, seed: int = 0, rank: int = DEMO_LORA_RANK,
                      std: float = 0.5) -> dict[str, Any]:
    """Random LoRA weights for every attention and feed-forward linear layer of ``modules``, as numpy float32
    arrays keyed in ``fmt`` ("peft", "comfyui" or "kohya"; the same numbers in each, so all three load to the
    same adapter). ``std`` 0.5 changes the demo model's images by about 11 of 255 levels on average.
    """
    import numpy as np

    if fmt not in DEMO_LORA_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(DEMO_LORA_FORMATS)}")
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {}
    for module in sorted(name for name, features in modules.items() if features and _DEMO_TARGETS.search(name)):
        in_features, out_features = modules[module]
        down = rng.normal(0.0, std, (rank, in_features)).astype(np.float32)
        up = rng.normal(0.0, std, (out_features, rank)).astype(np.float32)
        if fmt == "peft":  # as diffusers' save_lora_weights writes them
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
        elif fmt == "comfyui":  # ComfyUI / ai-toolkit: the original model's prefix
            tensors[f"diffusion_model.{module}.lora_A.weight"] = down
            tensors[f"diffusion_model.{module}.lora_B.weight"] = up
        else:  # Kohya / musubi: dots become underscores; alpha = rank means a scale of 1
            base = "lora_unet_" + module.replace(".", "_")
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            tensors[f"{base}.alpha"] = np.array(float(rank), dtype=np.float32)
    return tensors


def write_demo_lora(path: Path, fmt: str, seed: int = 0) -> Path:
    """Write a demo LoRA for the demo model's transformer to ``path`` (same seed, same bytes)."""
    from safetensors.numpy import save_file

    from .architecture import TINY

    tensors = demo_lora_tensors(transformer_modules(TINY.transformer), fmt, seed)
    # One metadata key: safetensors writes several in no fixed order, and the same seed must give the same bytes.
    metadata = {"zimage_demo_lora": json.dumps({"format": fmt, "seed": seed, "rank": DEMO_LORA_RANK})}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)  # a server listing the folder never sees half a file
    return path

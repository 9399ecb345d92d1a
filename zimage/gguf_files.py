"""GGUF-quantized transformers (``--transformer-file PATH.gguf``): size from the header, loading, a demo writer.

The key layout is that of the original Z-Image checkpoint, which published Z-Image-Turbo GGUF files keep and
diffusers' single-file converter (``convert_z_image_transformer_checkpoint_to_diffusers`` in
``diffusers/loaders/single_file_utils.py``, 0.42.1) maps to ``ZImageTransformer2DModel``: ``x_embedder.`` and
``final_layer.`` (diffusers: ``all_x_embedder.2-1.``, ``all_final_layer.2-1.``), one fused
``attention.qkv.weight`` per block (diffusers: ``to_q``/``to_k``/``to_v``, split in three along the output
dimension), ``attention.out.`` (``to_out.0.``), ``attention.q_norm.``/``k_norm.`` (``norm_q``/``norm_k``); every
other name is the same in both.

The ``gguf`` package is imported only here, when a GGUF file is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import first_line, shown
from .planner import ComponentStats

#: Quantization types ``make-demo --gguf`` writes (those the gguf package 0.19.0 quantizes in numpy).
DEMO_GGUF_TYPES = ("Q8_0", "Q4_0")
#: diffusers name -> original checkpoint name (the inverse of diffusers' Z-Image single-file renames).
_TO_ORIGINAL = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
                (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
                (".attention.norm_k.", ".attention.k_norm."))


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is in requirements.txt
        raise ValueError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0") from exc
    try:
        return gguf.GGUFReader(str(path))  # memory-maps the file: no weight is read
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged header fails in numpy in many ways (IndexError, ...)
        raise ValueError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: "
                         f"{first_line(exc, 200)})") from exc


def gguf_transformer_stats(path: Path) -> ComponentStats:
    """Parameter counts of a GGUF transformer grouped as offloading moves them, and ``stored_bytes``: the sum of its
    tensors' bytes as stored (quantized), read from the header without loading weights. Raises ValueError for a
    file that is not GGUF."""
    from .model_files import stats_from_shapes

    reader = _reader(path)
    if not len(reader.tensors):
        raise ValueError(f"{path.name} is a GGUF file without tensors: it holds no transformer")
    shapes = {tensor.name: [int(tensor.n_elements)] for tensor in reader.tensors}
    stats = stats_from_shapes(shapes)
    from dataclasses import replace

    return replace(stats, stored_bytes=sum(int(tensor.n_bytes) for tensor in reader.tensors))


def gguf_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as ``--transformer-file`` (one line naming the setting and the fix), or None: it
    must be a readable GGUF file with tensors. Reads only the header. Never raises for these problems."""
    setting = f"--transformer-file {shown(str(path), 200)} (ZIMAGE_TRANSFORMER_FILE)"
    try:
        if path.is_dir():
            return f"{setting} is a folder: give the .gguf file itself (e.g. z_image_turbo-Q8_0.gguf)."
        if not path.exists():
            return (f"{setting} does not exist: give the path of a GGUF transformer (e.g. z_image_turbo-Q8_0.gguf), "
                    "or leave the setting out.")
        if not path.is_file():
            return f"{setting} is not a regular file (a device, a pipe?): give a .gguf file."
    except OSError as exc:  # e.g. a name longer than the file system allows
        return f"{setting} cannot be used ({exc.strerror or exc}): give the path of a .gguf file."
    try:
        gguf_transformer_stats(path)
    except OSError as exc:
        return f"{setting} cannot be read ({exc.strerror or exc}): check its permissions."
    except ValueError as exc:
        return f"{setting}: {exc}; give a GGUF transformer of Z-Image (e.g. z_image_turbo-Q8_0.gguf)."
    return None


def layout_problem(path: Path, config: dict[str, Any], model: str) -> str | None:
    """Why the tensors of the GGUF file ``path`` do not make the transformer of ``config`` (a
    ``ZImageTransformer2DModel`` config; ``model`` names it in the message), or None.

    Uses diffusers' own single-file conversion (``convert_z_image_transformer_checkpoint_to_diffusers``) on
    shape-only tensors from the header (the meta device: nothing is read or allocated) and compares every name and
    shape with the model built on the meta device. What diffusers' loader would otherwise report as "Cannot copy
    out of meta tensor" after the slow load is said here, before it. Raises ValueError for an unreadable file
    (:func:`gguf_file_problem` says that first)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    reader = _reader(path)
    # GGUF lists dimensions innermost first; diffusers' GGUF loader reverses them the same way.
    shapes = {tensor.name: torch.empty(tuple(int(d) for d in reversed(tensor.shape)), device="meta")
              for tensor in reader.tensors}
    setting = f"--transformer-file {path.name!r}"
    try:
        converted = convert_z_image_transformer_checkpoint_to_diffusers(shapes)
    except Exception as exc:  # noqa: BLE001 - e.g. a fused qkv that does not split in three
        return f"{setting} does not hold a Z-Image transformer ({type(exc).__name__}: {first_line(exc, 120)})."
    with init_empty_weights():
        expected = ZImageTransformer2DModel.from_config(config).state_dict()
    missing = [name for name in expected if name not in converted]
    unexpected = [name for name in converted if name not in expected]
    wrong = [name for name in expected if name in converted and tuple(converted[name].shape) != tuple(expected[name].shape)]
    if not (missing or unexpected or wrong):
        return None
    if wrong:
        name = wrong[0]
        detail = (f"{name} is {tuple(converted[name].shape)} where the model has {tuple(expected[name].shape)}"
                  f"{f' ({len(wrong)} tensors differ)' if len(wrong) > 1 else ''}")
    elif missing:
        detail = f"it lacks {len(missing)} of the transformer's tensors, e.g. {missing[0]}"
    else:
        detail = f"it has {len(unexpected)} tensors the transformer does not, e.g. {unexpected[0]}"
    return (f"{setting} is not a transformer of {model}: {detail}. Give the GGUF file made from this model's "
            "transformer, or the --model it was made from.")


def _count(n: int) -> str:
    """A weight count for people: 6.15B, 2.1M, 512."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def mismatch_problem(gguf_stats: ComponentStats, model_stats: ComponentStats, name: str, model: str) -> str | None:
    """Why a GGUF transformer of ``gguf_stats`` does not belong to a model whose transformer is ``model_stats``
    (their weight counts differ by more than :data:`PARAMS_TOLERANCE`), or None. Pure."""
    if not model_stats.params:
        return None
    if abs(gguf_stats.params - model_stats.params) <= PARAMS_TOLERANCE * model_stats.params:
        return None
    return (f"--transformer-file {name!r} holds {_count(gguf_stats.params)} weights, but the transformer of "
            f"{model} has {_count(model_stats.params)}: it is not this model's transformer. Give the GGUF file "
            "made from this model, or the --model it was made from.")


#: How far a GGUF transformer's weight count may be from the model's (published files keep a few small tensors
#: in another layout, never a share of the weights).
PARAMS_TOLERANCE = 0.01


def to_original_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ``ZImageTransformer2DModel`` state dict (numpy arrays) in the original checkpoint's key layout."""
    import numpy as np

    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.endswith(".attention.to_k.weight") or key.endswith(".attention.to_v.weight"):
            continue
        if key.endswith(".attention.to_q.weight"):
            base = key[: -len(".attention.to_q.weight")]
            out[base + ".attention.qkv.weight"] = np.concatenate(
                [state_dict[f"{base}.attention.to_{part}.weight"] for part in "qkv"], axis=0)
            continue
        for new, old in _TO_ORIGINAL:
            key = key.replace(new, old)
        out[key] = value
    return out


def write_transformer_gguf(transformer: Any, path: Path, quant: str) -> int:
    """Write ``transformer`` (a loaded ``ZImageTransformer2DModel``) to ``path`` as GGUF in the original key layout:
    the linear layers' 2-D weights quantized to ``quant`` (Q8_0 or Q4_0; rows must be multiples of the 32-value
    block), everything else (biases, norms, the pad tokens) in float32, as published GGUF files keep them.
    Returns the bytes of the tensors written."""
    import gguf

    if quant not in DEMO_GGUF_TYPES:
        raise ValueError(f"quantization {quant!r} is not one this writer makes: use {' or '.join(DEMO_GGUF_TYPES)}.")
    kind = getattr(gguf.GGMLQuantizationType, quant)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    arrays = {k: v.detach().float().cpu().numpy() for k, v in transformer.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch="z_image")
    total = 0
    for name, array in to_original_state_dict(arrays).items():
        if name.endswith(".weight") and array.ndim == 2 and array.shape[-1] % block == 0:
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            data = array.astype("float32")
            writer.add_tensor(name, data)
        total += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def load_gguf_transformer(path: Path, config: str, dtype: Any) -> Any:
    """``ZImageTransformer2DModel.from_single_file`` of a GGUF file with diffusers' ``GGUFQuantizationConfig``
    (weights stay quantized, dequantized layer by layer into ``dtype`` while computing). ``config`` is the model
    folder or hub id whose ``transformer/`` config describes the architecture (nothing is fetched for a local
    folder). Raises OSError/ValueError from diffusers for a file it cannot map."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    try:
        return ZImageTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), config=config,
            subfolder="transformer", dtype=dtype)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers fails in many ways on tensors that do not fit the config
        # (SingleFileComponentError for missing weights, NotImplementedError from a meta tensor left unfilled, ...)
        raise ValueError(f"its tensors do not make this model's transformer ({type(exc).__name__}: "
                         f"{first_line(exc, 200)})") from exc


#: Quantization types diffusers 0.42.1 dequantizes (``SUPPORTED_GGUF_QUANT_TYPES`` in
#: ``diffusers/quantizers/gguf/utils.py``): what ``plan --gguf-quant`` accepts.
DIFFUSERS_GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K",
                        "Q2_K", "BF16")


def estimated_gguf_stats(stats: ComponentStats, quant: str) -> ComponentStats:
    """``stats`` as if every weight were stored as GGUF type ``quant`` (``plan --gguf-quant``, before downloading a
    file): ``stored_bytes`` = parameters x the type's bytes per weight (gguf's ``GGML_QUANT_SIZES``: block bytes over
    block size, e.g. Q8_0 34/32, Q4_0 18/32). A slight underestimate: published files keep norms and biases in F32.
    Raises ValueError naming the accepted types for any other ``quant``."""
    if quant not in DIFFUSERS_GGUF_TYPES:
        raise ValueError(f"--gguf-quant {shown(quant)} is not a GGUF type diffusers can load: use one of "
                         f"{', '.join(DIFFUSERS_GGUF_TYPES)}.")
    import gguf
    from dataclasses import replace

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    return replace(stats, stored_bytes=stats.params * type_size // block_size)

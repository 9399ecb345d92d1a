"""Find a model's folder and read its component sizes from safetensors headers, loading no weights."""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .planner import PUBLISHED_SIZES, ComponentSizes, ComponentStats

COMPONENTS = ("transformer", "text_encoder", "vae")
_DTYPE_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                   "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def looks_like_local_path(source: str) -> bool:
    """A model argument that is meant as a folder (exists, or is written like a path)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def find_local_model_folder(source: str) -> Path | None:
    """The folder holding ``source``: itself if local, else its snapshot in the Hugging Face cache.

    Never downloads. Returns None when the model is not on this machine.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if looks_like_local_path(source):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors.index.json"]))
    except Exception:  # noqa: BLE001 - any failure here only means "not cached"
        return None


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: tensor names, dtypes and shapes (8 bytes + JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path}: safetensors header of {length} bytes is not plausible")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def component_stats(folder: Path) -> ComponentStats:
    """Parameter counts of one component folder, grouped the way offloading moves them."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    stats = _stats_from_files(files)
    hidden = 0
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        hidden = int(config.get("dim") or config.get("hidden_size") or 0)
    return replace(stats, hidden_size=hidden)


def controlnet_stats(path: Path) -> tuple[ComponentStats, int]:
    """(parameter counts, number of control layers) of a ControlNet, from a diffusers folder (``config.json`` and
    weights) or a single ``.safetensors`` checkpoint (alibaba-pai's published form), headers only.

    The counts are the ControlNet's own weights; the modules it borrows from the transformer are not in its files.
    The hidden size comes from the control patch embedding's output (``control_all_x_embedder.*.weight``: dim x in).
    """
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    headers = {name: info for file in files for name, info in read_safetensors_header(file).items()}
    stats = _stats_from_headers(headers)
    layers = {name.split(".")[1] for name in headers if name.startswith("control_layers.")}
    hidden = next((info["shape"][0] for name, info in headers.items()
                   if name.startswith("control_all_x_embedder.") and name.endswith(".weight")), 0)
    return replace(stats, hidden_size=int(hidden)), len(layers)


def _stats_from_files(files: list[Path]) -> ComponentStats:
    return _stats_from_headers({name: info for file in files for name, info in read_safetensors_header(file).items()})


def stats_from_shapes(shapes: dict[str, list[int]]) -> ComponentStats:
    """:class:`ComponentStats` from tensor names and shapes (a safetensors header's, a GGUF file's)."""
    return _stats_from_headers({name: {"shape": shape} for name, shape in shapes.items()})


def _stats_from_headers(headers: dict) -> ComponentStats:
    """Counts grouped the way offloading moves them: numbered blocks, everything else, and the largest module."""
    blocks: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = non_block = 0
    for name, info in headers.items():
        count = 1
        for dim in info["shape"]:
            count *= dim
        total += count
        parts = name.split(".")
        # A numbered module (layers.12) is one block for group offloading.
        block_end = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if block_end is None:
            non_block += count
        else:
            blocks[".".join(parts[: block_end + 1])] += count
        leaves[".".join(parts[:-1])] += count
    return ComponentStats(params=total, largest_block_params=max(blocks.values(), default=0),
                          non_block_params=non_block, largest_leaf_params=max(leaves.values(), default=0))


def read_component_sizes(folder: Path) -> ComponentSizes:
    """Sizes of the transformer, text encoder and VAE of a diffusers folder, from headers only."""
    stats = {name: component_stats(folder / name) for name in COMPONENTS}
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    return ComponentSizes(transformer=stats["transformer"], text_encoder=stats["text_encoder"], vae=stats["vae"],
                          vae_base_channels=int(vae_config.get("block_out_channels", [128])[0]),
                          source=f"safetensors headers in {folder.name}")


def sizes_for(source: str, folder: Path | None) -> ComponentSizes:
    """Real sizes when the weights are on disk, else the published sizes of Z-Image-Turbo."""
    if folder is not None:
        try:
            return read_component_sizes(folder)
        except (OSError, ValueError, KeyError):
            pass
    return PUBLISHED_SIZES

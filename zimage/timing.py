"""Pure arithmetic for the planner's time model: FLOPs per image, and the rates of common cards. No torch here.

The planner (:mod:`zimage.planner`) predicts each placement's seconds per image as

    (transformer FLOPs + text encoder FLOPs) / the card's bf16 matmul rate
    + bytes moved host-to-device per image / the host-to-device bandwidth
    + bytes cast on the GPU per image / the GPU's memory bandwidth

with no overlap of copies and compute assumed (an upper estimate for the prefetching placements). The last term is
the price of weights stored in another dtype than the one they compute in: fp8 storage (diffusers' layerwise
casting casts each layer up before its forward and back down after it) and GGUF (dequantized at every forward).
The rates come
from a short probe at start on a real GPU (:func:`zimage.hardware.probe_throughput`: measured), or for
``python -m zimage plan --vram-gb`` from ``--tflops``/``--pcie-gbps`` or :data:`KNOWN_GPUS` (spec sheets, scaled by
the assumed efficiencies below). None of the resulting seconds has been checked on a GPU yet:
``benchmarks/gpu_profiles.py`` prints predicted next to measured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import shown

#: The transformer pads image and caption tokens to a multiple of this (diffusers' SEQ_MULTI_OF for Z-Image).
SEQ_MULTIPLE = 32
#: Caption tokens the planner assumes for the time model: a prompt of a few sentences with its chat template.
#: (The memory model assumes the worst case, 512.) The text encoder itself always runs 512 tokens: the pipeline
#: pads to max_sequence_length.
PLANNED_CAPTION_TOKENS = 128
TEXT_ENCODER_TOKENS = 512

#: Share of a spec sheet's dense bf16 rate that large bf16 matmuls reach in practice (assumed, not measured here:
#: cuBLAS typically reaches 60-80% on big GEMMs; attention and norms do worse). A probed rate is used as measured.
SPEC_MATMUL_EFFICIENCY = 0.7
#: Share of a PCIe link's theoretical rate that pinned host-to-device copies reach (assumed: about 80% is the usual
#: figure for x16 links). A probed bandwidth is used as measured.
SPEC_PCIE_EFFICIENCY = 0.8
#: Share of a card's memory bandwidth that large elementwise casts reach (assumed: streaming kernels typically reach
#: 80-90% of the spec). A probed bandwidth is used as measured.
SPEC_MEMORY_EFFICIENCY = 0.8
#: Theoretical host-to-device rate of a PCIe x16 link per generation, GB/s (1e9 bytes; PCI-SIG: 8, 16, 32 GT/s per
#: lane with 128b/130b encoding).
PCIE_X16_GBPS = {3: 15.75, 4: 31.5, 5: 63.0}


def padded(tokens: int) -> int:
    """``tokens`` rounded up to the transformer's sequence multiple."""
    return math.ceil(tokens / SEQ_MULTIPLE) * SEQ_MULTIPLE


def transformer_flops_per_image(config: Mapping[str, Any], width: int, height: int, steps: int,
                                caption_tokens: int) -> float:
    """Floating-point operations of the transformer for one image (multiply-add = 2 FLOPs), one forward per step.

    ``config`` is the transformer's config (``dim``, ``n_layers``, ``n_refiner_layers``, ``all_patch_size``,
    ``in_channels``, ``cap_feat_dim``). Per forward: the main layers over image + caption tokens, the noise refiner
    over image tokens, the context refiner over caption tokens; each block is q/k/v/o projections (4 d^2 per
    token), the SwiGLU feed-forward (3 d h, h = 8d/3) and attention (QK^T and AV: 2 S^2 d per block), plus the
    patch/caption embedders and the final layer. Classifier-free guidance doubles it (the caller multiplies).
    """
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    patch = config["all_patch_size"][0]
    latent_channels = config["in_channels"]
    image_tokens = padded((width // 8 // patch) * (height // 8 // patch))
    caption = padded(caption_tokens)

    def block(tokens: int) -> float:
        return 2 * tokens * (4 * dim * dim + 3 * dim * hidden) + 2 * 2 * tokens * tokens * dim

    patch_features = patch * patch * latent_channels
    per_forward = (config["n_layers"] * block(image_tokens + caption)
                   + config["n_refiner_layers"] * (block(image_tokens) + block(caption))
                   + 2 * image_tokens * patch_features * dim * 2  # x embedder and final layer
                   + 2 * caption * config["cap_feat_dim"] * dim)
    return per_forward * steps


def dense_flops(params: int, tokens: int) -> float:
    """FLOPs of a stack of linear layers holding ``params`` weights over ``tokens`` tokens (no attention): the
    estimate used when a transformer's config is unknown, and for the text encoder (attention over 512 tokens is a
    few percent of a 2560-wide model's work)."""
    return 2.0 * params * tokens


def vae_decode_flops(pixels: int) -> float:
    """FLOPs of the Flux VAE's decoder for one image of ``pixels`` output pixels: 9.49 MFLOP per pixel of convolutions
    plus its mid-block attention over the latent (pixels / 64 tokens of 512 channels: 2048 FLOPs per token pair).
    Fitted to torch's FlopCounterMode on the published VAE config at 256, 1024 and 2048 px (within 1%)."""
    tokens = pixels / 64
    return 9.49e6 * pixels + 2048 * tokens * tokens


def vae_encode_flops(pixels: int) -> float:
    """FLOPs of the Flux VAE's encoder for one input image of ``pixels`` pixels (4.16 MFLOP per pixel plus the same
    attention as the decoder; fitted like :func:`vae_decode_flops`)."""
    tokens = pixels / 64
    return 4.16e6 * pixels + 2048 * tokens * tokens


#: The pageable round-trip rate assumed when it is not measured: host-to-device from pageable memory and back into
#: a new host tensor, 1/(1/8.0 + 1/1.4) GB/s, as measured on the host of an NVIDIA H200
#: (gpu-mechanisms-nvidia-h200-2026-12-04.json, copy_rates: 8.0 GB/s pageable host-to-device, 1.4 GB/s device-to-host
#: into a new tensor). A property of the host (its page faults and memcpy), not of the card; desktops may differ,
#: which is why the server's start-up probe measures it.
ASSUMED_PAGEABLE_GBPS = 1.19


@dataclass(frozen=True)
class Throughput:
    """What the time model needs of a GPU: its bf16 matmul rate (TFLOP/s, 1e12), its pinned host-to-device copy rate,
    its pageable round-trip rate (a byte moved host-to-device from pageable memory and back into a new host tensor,
    as model offload does: GB/s of weights per round trip), and its memory bandwidth (GB/s, 1e9 bytes; bytes read
    plus bytes written), all as achieved (a probe's measurement, or a spec sheet scaled by the assumed efficiencies),
    and where they came from."""

    bf16_tflops: float
    h2d_gbps: float
    memory_gbps: float
    source: str
    pageable_gbps: float = ASSUMED_PAGEABLE_GBPS


@dataclass(frozen=True)
class GpuSpec:
    """A card's spec-sheet figures: memory (GB as sold, 1e9 bytes), dense bf16 tensor rate (TFLOP/s, without
    sparsity; for GeForce cards the FP16/BF16 rate with FP32 accumulate), its memory bandwidth (GB/s) and its PCIe
    link (generation, lanes)."""

    name: str
    memory_gb: float
    dense_bf16_tflops: float
    memory_gbps: float
    pcie_gen: int
    pcie_lanes: int = 16
    source: str = ""
    #: CUDA compute capability (fp8 tensor cores from 8.9: Ada, Hopper, Blackwell).
    compute_capability: tuple[int, int] = (8, 0)

    def throughput(self) -> Throughput:
        """Spec-sheet rates scaled by :data:`SPEC_MATMUL_EFFICIENCY`, :data:`SPEC_PCIE_EFFICIENCY` and
        :data:`SPEC_MEMORY_EFFICIENCY`."""
        link = PCIE_X16_GBPS[self.pcie_gen] * self.pcie_lanes / 16
        return Throughput(bf16_tflops=self.dense_bf16_tflops * SPEC_MATMUL_EFFICIENCY,
                          h2d_gbps=link * SPEC_PCIE_EFFICIENCY,
                          memory_gbps=self.memory_gbps * SPEC_MEMORY_EFFICIENCY,
                          pageable_gbps=min(ASSUMED_PAGEABLE_GBPS, link * SPEC_PCIE_EFFICIENCY),
                          source=f"spec sheet of the {self.name} (not measured): {self.dense_bf16_tflops:g} TFLOPS "
                                 f"dense bf16 x {SPEC_MATMUL_EFFICIENCY:g}, PCIe {self.pcie_gen}.0 x{self.pcie_lanes} "
                                 f"x {SPEC_PCIE_EFFICIENCY:g}, {self.memory_gbps:g} GB/s memory x "
                                 f"{SPEC_MEMORY_EFFICIENCY:g}, pageable round trip {ASSUMED_PAGEABLE_GBPS:g} GB/s "
                                 "(measured on one host)")


_ADA = "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 40 series), FP16/BF16 tensor, FP32 accumulate, dense"
_AMPERE_GEFORCE = "NVIDIA Ampere GA10x whitepaper / GA106 figures, FP16/BF16 tensor, FP32 accumulate, dense"

#: Common cards, spec-sheet figures (vendor datasheets and architecture whitepapers; dense, i.e. without the 2:4
#: sparsity that doubles the headline numbers). They are not measured here: the planner scales them by the assumed
#: efficiencies above, and a real GPU is probed instead at start.
KNOWN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("RTX 3060 12GB", 12, 25.6, 360, 4, source=_AMPERE_GEFORCE + " (112 tensor cores at 1.78 GHz); 360 GB/s",
            compute_capability=(8, 6)),
    GpuSpec("RTX 4060 8GB", 8, 30.2, 272, 4, 8,
            source=_ADA + " (96 tensor cores at 2.46 GHz); 272 GB/s; PCIe 4.0 x8", compute_capability=(8, 9)),
    GpuSpec("RTX 4060 Ti 16GB", 16, 44.1, 288, 4, 8,
            source=_ADA + " (136 tensor cores at 2.54 GHz); 288 GB/s; PCIe 4.0 x8", compute_capability=(8, 9)),
    GpuSpec("RTX 4070 12GB", 12, 58.3, 504.2, 4, source=_ADA + " (184 tensor cores at 2.48 GHz); 504 GB/s",
            compute_capability=(8, 9)),
    GpuSpec("RTX 4080 16GB", 16, 97.5, 716.8, 4, source=_ADA + "; 716.8 GB/s", compute_capability=(8, 9)),
    GpuSpec("RTX 4090 24GB", 24, 165.2, 1008, 4, source=_ADA + "; 1,008 GB/s", compute_capability=(8, 9)),
    GpuSpec("RTX 5090 32GB", 32, 209.5, 1792, 5, source="NVIDIA Blackwell (RTX 50 series) whitepaper, FP16/BF16 tensor, "
                                                        "FP32 accumulate, dense; 1,792 GB/s",
            compute_capability=(12, 0)),
    GpuSpec("A10 24GB", 24, 125.0, 600, 4, source="NVIDIA A10 datasheet: BF16 tensor 125 TFLOPS (250 with sparsity), "
                                                  "600 GB/s", compute_capability=(8, 6)),
    GpuSpec("L4 24GB", 24, 121.0, 300, 4, source="NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS with sparsity, half "
                                                 "dense; 300 GB/s", compute_capability=(8, 9)),
    GpuSpec("L40S 48GB", 48, 362.05, 864, 4, source="NVIDIA L40S datasheet: BF16 tensor 362.05 TFLOPS (733 with "
                                                    "sparsity), 864 GB/s", compute_capability=(8, 9)),
    GpuSpec("A100 80GB", 80, 312.0, 2039, 4, source="NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS (624 with "
                                                    "sparsity), 2,039 GB/s (SXM; PCIe card 1,935); host link PCIe 4.0 "
                                                    "x16 (SXM and PCIe cards)", compute_capability=(8, 0)),
    GpuSpec("H100 80GB", 80, 989.4, 3350, 5, source="NVIDIA H100 SXM datasheet: BF16 tensor 1,979 TFLOPS with "
                                                    "sparsity, 989.4 dense, 3.35 TB/s (the PCIe card: 756 dense, "
                                                    "2 TB/s); host link PCIe 5.0 x16", compute_capability=(9, 0)),
    GpuSpec("H200 141GB", 141, 989.4, 4800, 5, source="NVIDIA H200 datasheet (SXM): BF16 tensor 1,979 TFLOPS with "
                                                      "sparsity, 989.4 dense, 4.8 TB/s; host link PCIe 5.0 x16. The "
                                                      "planner's efficiencies were calibrated on one (its probe "
                                                      "measured 720-743 TFLOP/s and 55 GB/s pinned)",
            compute_capability=(9, 0)),
)


def _squash(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def find_gpu(name: str) -> GpuSpec:
    """The :data:`KNOWN_GPUS` entry ``name`` names: the whole name or the name without its memory ("RTX 4090",
    "A10", "L4"), spaces and case optional ("4060ti16gb"), or whole words of it ("4090", "4060 Ti"; "L40" is not
    "L40S"). Raises ValueError listing the known names when none match, or the matching ones when several do."""
    # The names drivers and nvidia-smi report ("NVIDIA GeForce RTX 4090") carry words the table leaves out.
    name = " ".join(word for word in name.split() if word.lower() not in ("nvidia", "geforce", "tesla"))
    wanted = _squash(name)
    full = lambda gpu: _squash(gpu.name)  # noqa: E731
    base = lambda gpu: _squash(gpu.name.rsplit(" ", 1)[0])  # noqa: E731 - without the memory
    for key in (full, base, lambda gpu: full(gpu).removeprefix("rtx"), lambda gpu: base(gpu).removeprefix("rtx")):
        exact = [gpu for gpu in KNOWN_GPUS if wanted and key(gpu) == wanted]
        if len(exact) == 1:
            return exact[0]
    words = _tokens(name)

    def has_words(gpu: GpuSpec) -> bool:
        tokens = _tokens(gpu.name)
        return any(tokens[i:i + len(words)] == words for i in range(len(tokens)))

    matches = [gpu for gpu in KNOWN_GPUS if words and has_words(gpu)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"gpu name {shown(name)} matches several cards: {', '.join(gpu.name for gpu in matches)}; "
                         "give more of the name.")
    known = ", ".join(gpu.name for gpu in KNOWN_GPUS)
    raise ValueError(f"gpu name {shown(name)} is not in the table: use one of {known}, or give --vram-gb with --tflops, "
                     "--pcie-gbps and --memory-gbps.")

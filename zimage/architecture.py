"""Z-Image-Turbo's architecture as configs, and a builder of random-weight pipelines from them.

:data:`PUBLISHED` holds the configs of the published model files (transformer, Qwen3-4B text
encoder, Flux VAE, scheduler); built on the meta device they count exactly the parameters in
:data:`zimage.planner.PUBLISHED_SIZES` (pinned by a test). :data:`TINY` is the demo model: the same
classes at toy sizes. :func:`build_random_pipeline` turns either into a ``ZImagePipeline`` with
random weights: the demo model on the CPU, and the full-size model on a GPU for the benchmark
(``benchmarks/gpu_profiles.py``), so memory and speed are measured without downloading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the three weighted components and the scheduler."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]  # Qwen3Config keyword arguments (vocab_size None: the tokenizer's size)
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False})


PUBLISHED = Architecture(
    name="Z-Image-Turbo (published configs)",
    transformer={
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
        "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
        "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    text_encoder={
        "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    vae={
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2, "norm_num_groups": 32, "latent_channels": 16, "sample_size": 1024,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    },
)

TINY = Architecture(
    name="demo (tiny, random weights)",
    transformer={
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 32, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True,
        "cap_feat_dim": 16, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4],
        # 256 patches per side = 4096 px: room for the largest size the service allows.
        "axes_lens": [1024, 256, 256],
    },
    text_encoder={
        "vocab_size": None,
        "hidden_size": 16,  # must equal the transformer's cap_feat_dim
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 8, "max_position_embeddings": 1024, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    vae={
        # Four levels like the real Flux VAE, so the spatial factor is 8 as in production.
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [16, 16, 16, 16],
        "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 16,
        # As the real VAE: tiling then works (a small sample_size makes GroupNorm fail on 1x1 tiles).
        "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
)


def build_components(arch: Architecture, vocab_size: int) -> dict[str, Any]:
    """The transformer, text encoder and VAE of ``arch`` with freshly initialised (random) weights.

    Built under the caller's ``torch.device``/default-dtype context, so the full-size model can be
    created directly on a GPU in bf16 (or on the meta device to count parameters).
    """
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = ZImageTransformer2DModel(**arch.transformer)
    if transformer.x_pad_token.device.type != "meta":
        # These are created with torch.empty; uninitialised memory can hold NaN/inf.
        with torch.no_grad():
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
    encoder_args = dict(arch.text_encoder)
    encoder_args["vocab_size"] = encoder_args["vocab_size"] or vocab_size
    text_encoder = Qwen3Model(Qwen3Config(**encoder_args))
    vae = AutoencoderKL(**arch.vae)
    return {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}


def build_random_pipeline(arch: Architecture, tokenizer: Any, seed: int = 0) -> Any:
    """A ``ZImagePipeline`` of ``arch`` with random weights drawn from ``seed``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.manual_seed(seed)
    components = build_components(arch, vocab_size=len(tokenizer))
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**arch.scheduler), tokenizer=tokenizer,
                          **components)


def parameter_counts(arch: Architecture, vocab_size: int = 151936) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        components = build_components(arch, vocab_size)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}

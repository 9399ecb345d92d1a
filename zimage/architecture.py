"""Z-Image-Turbo's architecture as configs, and a builder of random-weight pipelines from them.

:data:`PUBLISHED` holds the configs of the published model files (transformer, Qwen3-4B text
encoder, Flux VAE, scheduler) and of the ControlNet Union 2.1; built on the meta device they count exactly the
parameters in :data:`zimage.planner.PUBLISHED_SIZES` and :data:`zimage.planner.PUBLISHED_CONTROLNET` (pinned by a
test). :data:`TINY` is the demo model: the same
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
    #: ``ZImageControlNetModel`` arguments of a ControlNet that fits this transformer (dim, heads, refiner layers).
    controlnet: dict[str, Any] = field(default_factory=dict)


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
    # alibaba-pai's Z-Image-Turbo Fun ControlNet Union 2.1, the config diffusers maps that checkpoint to
    # (hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1/config.json, as published): control blocks beside every second
    # transformer layer (15) and 2 control noise-refiner blocks, control input = 16 latent channels + 1 mask + 16
    # masked-image channels. Counted on the meta device: 3,356,225,792 parameters, 6.71 GB in bf16 (the published
    # checkpoint file is 6.71 GB).
    controlnet={
        "control_layers_places": list(range(0, 30, 2)), "control_refiner_layers_places": [0, 1],
        "control_in_dim": 33, "add_control_noise_refiner": "control_noise_refiner", "all_patch_size": (2,),
        "all_f_patch_size": (1,), "dim": 3840, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
        "norm_eps": 1e-5, "qk_norm": True,
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
    # The Union 2.1 structure at the tiny transformer's size: a control block beside both transformer layers, one
    # control refiner block (the tiny transformer has one refiner layer), control_in_dim 33 so that both the
    # ControlNet and the ControlNet-inpainting pipelines accept it.
    controlnet={
        "control_layers_places": [0, 1], "control_refiner_layers_places": [0], "control_in_dim": 33,
        "add_control_noise_refiner": "control_noise_refiner", "all_patch_size": (2,), "all_f_patch_size": (1,),
        "dim": 32, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "norm_eps": 1e-5, "qk_norm": True,
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


def build_controlnet(arch: Architecture, *, seed: int = 0, steer: bool = False) -> Any:
    """A ``ZImageControlNetModel`` of ``arch.controlnet`` with random weights drawn from ``seed``.

    diffusers creates its ``before_proj``/``after_proj`` layers zeroed (a new ControlNet starts with no effect, as
    for training). ``steer=True`` draws them at random too, so that the demo ControlNet changes the image (the tests
    and the page can see that the control image reaches the transformer).
    """
    import torch
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(**arch.controlnet)
    if steer:
        with torch.no_grad():
            for name, module in controlnet.named_modules():
                if name.endswith(("before_proj", "after_proj")):
                    torch.nn.init.normal_(module.weight, std=0.05)
    return controlnet


def parameter_counts(arch: Architecture, vocab_size: int = 151936) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        components = build_components(arch, vocab_size)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}
    if arch.controlnet:
        with torch.device("meta"):
            counts["controlnet"] = sum(p.numel() for p in build_controlnet(arch).parameters())
    return counts

"""What the model is made of and what a request asks of it: component sizes (parameter counts from weight-file
headers or published configs) and request sizes. Plain data for the planner's peak and time models; no torch here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

GIB = 1024**3
MIB = 1024**2
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Steps the time model assumes when a request does not say (Turbo's default).
PLANNED_STEPS = 8
#: Pixels per latent token: VAE factor 8 times patch size 2, squared.
PIXELS_PER_TOKEN = 16 * 16


@dataclass(frozen=True)
class ComponentStats:
    """Parameter counts of one component, read from its weight files or published configs."""

    params: int
    largest_block_params: int = 0  # biggest numbered block (a transformer layer)
    non_block_params: int = 0  # everything outside numbered blocks (embeddings, heads)
    largest_leaf_params: int = 0  # biggest single module (what sequential offload moves)
    hidden_size: int = 0
    #: Bytes as stored when the weights are quantized (a GGUF transformer: the sum of its tensors' bytes from the
    #: file header); None: ``params`` x the dtype's bytes.
    stored_bytes: int | None = None


@dataclass(frozen=True)
class ComponentSizes:
    """The three weighted components (and a ControlNet when one is configured) and where the numbers came from.

    ``controlnet`` counts the ControlNet's own weights only: it borrows the transformer's embedders and refiner
    blocks (diffusers' ``ZImageControlNetModel.from_transformer``), which the transformer already counts.
    ``controlnet_hints`` is its number of control layers (one hint tensor each for the transformer).
    """

    transformer: ComponentStats
    text_encoder: ComponentStats
    vae: ComponentStats
    vae_base_channels: int = 128  # channels of the decoder's full-resolution stage
    source: str = "published sizes"
    controlnet: ComponentStats | None = None
    controlnet_hints: int = 0
    #: The transformer's config.json (dim, n_layers, n_refiner_layers, all_patch_size, in_channels, cap_feat_dim)
    #: for the FLOPs of the time model; None: FLOPs estimated from the parameter count.
    transformer_config: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def total_params(self) -> int:
        return (self.transformer.params + self.text_encoder.params + self.vae.params
                + (self.controlnet.params if self.controlnet is not None else 0))


#: Z-Image-Turbo's published architecture, counted on the meta device from its config.json files.
PUBLISHED_SIZES = ComponentSizes(
    transformer=ComponentStats(params=6_154_908_736, largest_block_params=180_910_336,
                               non_block_params=503_104, largest_leaf_params=39_321_600, hidden_size=3840),
    text_encoder=ComponentStats(params=4_022_468_096, largest_block_params=100_930_816,
                                non_block_params=388_958_720, largest_leaf_params=388_956_160, hidden_size=2560),
    vae=ComponentStats(params=83_819_683, largest_block_params=16_524_800, non_block_params=230_051,
                       largest_leaf_params=2_359_808),
    vae_base_channels=128,
    source="published sizes of Tongyi-MAI/Z-Image-Turbo",
    transformer_config={"dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "all_patch_size": [2], "in_channels": 16,
                        "cap_feat_dim": 2560},
)

#: alibaba-pai's Z-Image-Turbo Fun ControlNet Union 2.1 (the largest published Z-Image ControlNet; 1.0 has 6 control
#: layers, 3.10 GB, and the 2.1 "lite" 3, 2.02 GB), counted on the meta device from the config diffusers maps that
#: checkpoint to (hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1: control layers at transformer layers 0, 2, ..., 28,
#: two control refiner blocks, dim 3840; see zimage.architecture.PUBLISHED): 3,356,225,792 parameters, 6.71 GB in
#: bf16, which is the published checkpoint's file size. Used when the ControlNet is not on disk; its files give the
#: real size otherwise (zimage.model_files.controlnet_stats).
PUBLISHED_CONTROLNET = ComponentStats(params=3_356_225_792, largest_block_params=210_409_216,
                                      non_block_params=510_720, largest_leaf_params=39_321_600, hidden_size=3840)
PUBLISHED_CONTROLNET_HINTS = 15


def with_controlnet(sizes: ComponentSizes, stats: ComponentStats | None, hints: int,
                    source: str = "") -> ComponentSizes:
    """``sizes`` with a ControlNet of ``stats`` (``hints`` control layers); ``stats=None`` removes it."""
    label = sizes.source if stats is None or not source else f"{sizes.source}; ControlNet: {source}"
    return replace(sizes, controlnet=stats, controlnet_hints=hints if stats is not None else 0, source=label)


@dataclass(frozen=True)
class RequestSize:
    """What one generation asks of memory."""

    width: int = 1024
    height: int = 1024
    num_images: int = 1
    guidance: bool = False  # guidance > 0 runs classifier-free guidance: twice the batch
    #: The VAE encodes an input before denoising (image-to-image, inpainting, the ControlNet's control image).
    encode: bool = False
    #: The ControlNet runs beside the transformer (the controlnet and controlnet_inpaint modes).
    controlnet: bool = False
    #: Denoising steps (transformer forwards), for the time model only.
    steps: int = PLANNED_STEPS

    @property
    def pixels(self) -> int:
        return self.width * self.height

"""The planner's peak model: predicted GPU bytes of one generation, as the CUDA caching allocator reserves them.

Pure; no torch. A placement's peak is its largest stage (text encoder, VAE encode of an input image, denoising, VAE
decode), each the weights on the GPU at that moment plus that stage's activations, plus a fixed overhead
(:func:`predict_allocated_bytes`). What the planner compares with the card's memory is what the allocator *reserves*
(:func:`predict_peak_bytes`): the allocated peak plus

* the allocator's slack: cached blocks it cannot reuse for the next stage's differently sized tensors (the
  fragmentation share below, per allocator configuration: expandable segments, which the server turns on, keep it
  small);
* a prefetching stream's own pool: diffusers' group offloading copies the next group on a side stream, and the blocks
  allocated there are cached for that stream alone (about the largest streamed group and the next ones);
* the churn of weights cast at every forward (fp8 storage's layerwise casting, a GGUF transformer's dequantization):
  one block's compute-dtype copy is allocated and freed per layer.

Every constant names the measurement it comes from: the stage peaks of an NVIDIA H200 run
(``benchmarks/results/gpu-nvidia-h200-2026-12-04-run3.json``, ``stage_peaks``: expandable segments) and the peaks of
the first run (``...-run1.json``: the default allocator). tests/test_planner.py holds the model to those rows: never
more than 3% below a measured reserved peak, at most 15% above.
"""

from __future__ import annotations

import math

from .sizes import GIB, MIB, ComponentSizes, ComponentStats, RequestSize

# --- Activations (bytes), calibrated on the H200's stage peaks at 1024x1024 --------------------------------------
#: Live activation bytes per token per hidden unit inside one transformer block. Measured: the denoise stage held
#: 0.40 GB beyond the weights compiled (run3, "full"); eager runs hold more (model-offload's peak, run1): 20 covers
#: both for the worst-case caption.
TRANSFORMER_ACTIVATION_HIDDEN_MULTIPLE = 20
#: Caption tokens the transformer sees at most (the pipeline's max_sequence_length).
MAX_CAPTION_TOKENS = 512
#: Pixels per latent token: VAE factor 8 times patch size 2, squared.
PIXELS_PER_TOKEN = 16 * 16
#: VAE decoder bytes per output pixel per channel of its widest full-resolution stage (128 channels), in bf16.
#: Measured: the decode stage held 2.43 GB beyond the weights and the fixed overhead at 1024x1024 (run3 "full" and
#: "transformer-resident": 17.5 bytes), 2.53 GB eager with the default allocator (run1 "full": 18.9).
VAE_DECODE_BYTES_PER_PIXEL_CHANNEL = 19.5
#: VAE encoder bytes per input pixel per channel (image-to-image, inpainting and the ControlNet's control image). Not
#: measured on a GPU yet: the decoder's constant, a cautious estimate (the encoder's full-resolution stage has the
#: same 128 channels and fewer blocks).
VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL = VAE_DECODE_BYTES_PER_PIXEL_CHANNEL
#: A ControlNet's hints: one (tokens x dim) tensor per control layer is kept for the transformer, and the
#: control blocks stack them as they go (``torch.stack`` of all hints so far): about twice the hints at the peak.
CONTROLNET_HINT_COPIES = 2
#: The tile edge the loader sets when vae-tiling is on (the Flux VAE's own tile is 1024 px,
#: which would leave a 1024x1024 decode untiled).
VAE_TILE_PX = 512
#: Text encoder: 512 tokens through the blocks, plus all hidden states kept (output_hidden_states). Measured: the
#: encode stage held 0.28 GB beyond the weights, fixed overhead included (run3 "full").
TEXT_ENCODER_ACTIVATION_HIDDEN_MULTIPLE = 60
#: cuBLAS workspaces, the prompt embeddings, latents and RoPE tables.
FIXED_OVERHEAD_BYTES = 192 * MIB

# --- What the allocator reserves beyond the allocated peak --------------------------------------------------------
#: Share of the allocated peak the caching allocator reserves on top, per configuration. Expandable segments
#: (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, zimage.hardware.CUDA_ALLOC_CONF): reserved was 2.2% above
#: allocated (run3 "full": 23.65 against 23.14 GB). The default allocator: 12.9% (run1 "full": 26.33 against
#: 23.32 GB).
FRAGMENTATION_SHARE = {"expandable": 0.03, "default": 0.13}
#: The prefetching stream's pool, in multiples of the largest group it copies: 1.25 for the text encoder at leaf level
#: (its token embedding, the largest leaf; run3 "transformer-resident": 1.30 GB reserved beyond allocated, of which
#: 0.97 is the pool), 3 for transformer blocks (the one running, the next, and one in flight; run1
#: "group-offload (streams)").
STREAM_POOL_LEAF_GROUPS = 1.25
STREAM_POOL_BLOCK_GROUPS = 3
#: Blocks of the compute dtype the allocator keeps cached from casting stored weights at every forward (layerwise
#: casting, GGUF dequantization): run1 "full + fp8-storage" reserved 2.9 GB beyond allocated, 0.8 more than "full"'s
#: share.
CAST_CHURN_BLOCKS = 2

ALLOCATORS = tuple(FRAGMENTATION_SHARE)
#: How the loader streams the text encoder (zimage.loader.stream_text_encoder): "leaf_level" since 2026-12-04,
#: "block_level" before (the first H200 run's rows; kept to check the model against them).
TEXT_ENCODER_OFFLOADS = ("leaf_level", "block_level")


def weight_bytes(stats: ComponentStats, dtype_bytes: int) -> int:
    return stats.params * dtype_bytes


def transformer_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, fp8: bool, fp8_compute: bool = False) -> int:
    """The transformer on the GPU: fp8 compute stores 1 byte per weight (torchao's float8 weights and their per-row
    scales, under 0.1%); fp8 storage 1 byte plus one block upcast while it runs; a GGUF file its quantized bytes plus
    one block dequantized."""
    if fp8_compute:
        return sizes.transformer.params
    if sizes.transformer.stored_bytes is not None:
        return sizes.transformer.stored_bytes + sizes.transformer.largest_block_params * dtype_bytes
    if not fp8:
        return weight_bytes(sizes.transformer, dtype_bytes)
    return sizes.transformer.params + sizes.transformer.largest_block_params * dtype_bytes


def text_encoder_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, te_fp8: bool) -> int:
    """The text encoder's weights; with te-fp8-storage its blocks' linear layers take 1 byte per weight (the token
    embedding and norms, outside the blocks, stay in the compute dtype), plus one block upcast while it runs."""
    stats = sizes.text_encoder
    if not te_fp8:
        return weight_bytes(stats, dtype_bytes)
    return ((stats.params - stats.non_block_params) + stats.non_block_params * dtype_bytes
            + stats.largest_block_params * dtype_bytes)


def controlnet_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, fp8: bool) -> int:
    """The ControlNet's own weights (0 without one); fp8-storage stores them in fp8 like the transformer's."""
    stats = sizes.controlnet
    if stats is None:
        return 0
    if not fp8:
        return weight_bytes(stats, dtype_bytes)
    return stats.params + stats.largest_block_params * dtype_bytes


def activation_bytes(sizes: ComponentSizes, request: RequestSize, dtype_bytes: int,
                     vae_tiling: bool) -> dict[str, int]:
    """Estimated peak activation bytes of each stage for one request.

    Stages: ``text_encoder``, ``vae_encode`` (0 unless the request encodes an input image), ``transformer`` (with
    the ControlNet's hints when the request uses it: they are held while the transformer runs) and ``vae`` (the
    decode).
    """
    batch = request.num_images * (2 if request.guidance else 1)
    image_tokens = math.ceil(request.pixels / PIXELS_PER_TOKEN)
    tokens = batch * (image_tokens + MAX_CAPTION_TOKENS)
    transformer = tokens * sizes.transformer.hidden_size * TRANSFORMER_ACTIVATION_HIDDEN_MULTIPLE * dtype_bytes
    if request.controlnet and sizes.controlnet is not None:
        transformer += (CONTROLNET_HINT_COPIES * (sizes.controlnet_hints + 1) * tokens
                        * sizes.controlnet.hidden_size * dtype_bytes)
    text_encoder = (batch * MAX_CAPTION_TOKENS * sizes.text_encoder.hidden_size
                    * TEXT_ENCODER_ACTIVATION_HIDDEN_MULTIPLE * dtype_bytes)
    decoded_pixels = min(request.pixels, VAE_TILE_PX**2) if vae_tiling else request.pixels
    # Tiles are decoded one at a time but all images of the batch together; the decoded full image
    # (float32 RGB) is kept in any case.
    vae = int(request.num_images * decoded_pixels * sizes.vae_base_channels * VAE_DECODE_BYTES_PER_PIXEL_CHANNEL
              * dtype_bytes / 2 + request.num_images * request.pixels * 3 * 4)
    # The input goes through the encoder as one batch of num_images (diffusers repeats it per image), tiled like
    # the decode when tiling is on; the input pixels themselves are held in the compute dtype.
    vae_encode = 0
    if request.encode:
        vae_encode = int(request.num_images * decoded_pixels * sizes.vae_base_channels
                         * VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL * dtype_bytes / 2
                         + request.num_images * request.pixels * 3 * dtype_bytes)
    return {"text_encoder": text_encoder, "vae_encode": vae_encode, "transformer": transformer, "vae": vae}


def text_encoder_live_bytes(sizes: ComponentSizes, dtype_bytes: int, te_fp8: bool, use_streams: bool,
                            offload: str = "leaf_level") -> int:
    """The text encoder's bytes on the GPU while it runs group-offloaded. Leaf level: its largest leaf, the token
    embedding (outside the blocks, in the compute dtype), with a layer or two in flight. Block level: the embedding
    and one block (two with the prefetching stream), blocks at 1 byte per weight with te-fp8-storage."""
    stats = sizes.text_encoder
    if offload == "leaf_level":
        # The embedding, then about half a block's linear layers in flight (a decoder block is four big ones).
        return stats.non_block_params * dtype_bytes + stats.largest_block_params * dtype_bytes // 2
    blocks_resident = 2 if use_streams else 1
    block_bytes = 1 if te_fp8 else dtype_bytes
    return stats.non_block_params * dtype_bytes + blocks_resident * stats.largest_block_params * block_bytes


def predict_allocated_bytes(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                            dtype_bytes: int, use_streams: bool = False,
                            text_encoder_offload: str = "leaf_level") -> int:
    """Predicted peak bytes the tensors of one generation hold on the GPU under ``profile`` (single GPU; 0 for cpu):
    the largest stage. See :func:`predict_peak_bytes` for what the planner compares with the card.

    A configured ControlNet is resident under ``full``/``balanced``/``transformer-resident`` (placed with the
    transformer at load), so it counts for every request there; under the offload profiles it reaches the GPU only
    for a request that uses it (``request.controlnet``), as the loader places it (zimage.loader).
    """
    if profile == "cpu":
        return 0
    acts = activation_bytes(sizes, request, dtype_bytes, "vae-tiling" in options)
    fp8 = "fp8-storage" in options
    te_fp8 = "te-fp8-storage" in options
    transformer_w = transformer_weight_bytes(sizes, dtype_bytes, fp8, "fp8-compute" in options)
    text_encoder_w = text_encoder_weight_bytes(sizes, dtype_bytes, te_fp8)
    vae_w = weight_bytes(sizes.vae, dtype_bytes)
    controlnet_w = controlnet_weight_bytes(sizes, dtype_bytes, fp8)
    used_controlnet_w = controlnet_w if request.controlnet else 0
    if profile in ("full", "balanced"):  # balanced: callers split per GPU with balanced_split
        peak = transformer_w + text_encoder_w + vae_w + controlnet_w + max(acts.values())
    elif profile == "transformer-resident":
        live = text_encoder_live_bytes(sizes, dtype_bytes, te_fp8, use_streams, text_encoder_offload)
        peak = (transformer_w + vae_w + controlnet_w
                + max(live + acts["text_encoder"], acts["vae_encode"], acts["transformer"], acts["vae"]))
    elif profile == "model-offload":
        # Each component moves to the GPU when it runs and the chain text encoder -> transformer -> VAE sends the
        # previous one back. The VAE that encoded an input stays until the chain wraps (the decode) and the text
        # encoder is still there while it encodes. A ControlNet request's denoise has the transformer, the ControlNet
        # and the VAE (which encodes the control image) on the GPU together (zimage.loader.denoise_placement).
        encoded_vae_w = vae_w if request.encode else 0
        stages = [text_encoder_w + acts["text_encoder"],
                  transformer_w + encoded_vae_w + used_controlnet_w + acts["transformer"],
                  vae_w + acts["vae"]]
        if request.controlnet:
            stages.append(transformer_w + used_controlnet_w + vae_w + acts["vae_encode"])
        elif request.encode:
            stages.append(text_encoder_w + vae_w + acts["vae_encode"])
        peak = max(stages)
    elif profile == "group-offload":
        blocks_resident = 2 if use_streams else 1
        block_scale = 1 if not fp8 else 0.5
        if sizes.transformer.stored_bytes is not None:  # quantized blocks, each dequantized while it runs
            block_scale = 1 + sizes.transformer.stored_bytes / max(1, sizes.transformer.params * dtype_bytes)
        transformer_live = (sizes.transformer.non_block_params * dtype_bytes
                            + int(blocks_resident * sizes.transformer.largest_block_params * dtype_bytes * block_scale))
        text_encoder_live = text_encoder_live_bytes(sizes, dtype_bytes, te_fp8, use_streams, text_encoder_offload)
        # The ControlNet is group-offloaded one block at a time, without prefetching (zimage.loader).
        controlnet_live = 0
        if request.controlnet and sizes.controlnet is not None:
            controlnet_live = (sizes.controlnet.non_block_params * dtype_bytes
                               + int(sizes.controlnet.largest_block_params * dtype_bytes * block_scale))
        peak = vae_w + max(text_encoder_live + acts["text_encoder"], acts["vae_encode"],
                           max(transformer_live, controlnet_live) + acts["transformer"], acts["vae"])
    elif profile == "sequential-offload":
        # One module's weights at a time, next to the activations of the stage it belongs to.
        controlnet_leaf = sizes.controlnet.largest_leaf_params if request.controlnet and sizes.controlnet else 0
        peak = max(sizes.text_encoder.largest_leaf_params * dtype_bytes + acts["text_encoder"],
                   sizes.vae.largest_leaf_params * dtype_bytes + acts["vae_encode"],
                   max(sizes.transformer.largest_leaf_params, controlnet_leaf) * dtype_bytes + acts["transformer"],
                   sizes.vae.largest_leaf_params * dtype_bytes + acts["vae"])
    else:
        raise ValueError(f"unknown memory profile {profile!r}")
    return int(peak + FIXED_OVERHEAD_BYTES)


def reserved_extra_bytes(profile: str, options: tuple[str, ...], sizes: ComponentSizes, dtype_bytes: int,
                         use_streams: bool, allocated: int, allocator: str,
                         text_encoder_offload: str = "leaf_level") -> int:
    """What the allocator reserves beyond ``allocated`` under this placement (see the module docstring)."""
    if profile == "cpu":
        return 0
    extra = allocated * FRAGMENTATION_SHARE[allocator]
    streamed_encoder = profile in ("transformer-resident", "group-offload") and use_streams
    if streamed_encoder:
        stats = sizes.text_encoder
        if text_encoder_offload == "leaf_level":
            extra += STREAM_POOL_LEAF_GROUPS * stats.non_block_params * dtype_bytes
        else:  # block level: the embedding moves without the stream; two blocks are in the stream's pool
            extra += 2 * stats.largest_block_params * (1 if "te-fp8-storage" in options else dtype_bytes)
    if profile == "group-offload" and use_streams:
        stored = (sizes.transformer.stored_bytes / max(1, sizes.transformer.params)
                  if sizes.transformer.stored_bytes is not None
                  else (1 if "fp8-storage" in options else dtype_bytes))
        extra += STREAM_POOL_BLOCK_GROUPS * sizes.transformer.largest_block_params * stored
    casts = "fp8-storage" in options or sizes.transformer.stored_bytes is not None
    if casts and profile != "model-offload":  # model offload's peak is a stage without casts (measured: run1)
        extra += CAST_CHURN_BLOCKS * sizes.transformer.largest_block_params * dtype_bytes
    return int(extra)


def predict_peak_bytes(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                       dtype_bytes: int, use_streams: bool = False, allocator: str = "expandable",
                       text_encoder_offload: str = "leaf_level") -> int:
    """Predicted peak GPU bytes the allocator reserves for one generation under ``profile`` (single GPU; 0 for cpu):
    :func:`predict_allocated_bytes` plus :func:`reserved_extra_bytes`. ``allocator``: "expandable" (the server's
    configuration) or "default" (PyTorch's, when PYTORCH_CUDA_ALLOC_CONF says otherwise). Raises ValueError for an
    unknown profile."""
    allocated = predict_allocated_bytes(profile, options, sizes, request, dtype_bytes, use_streams,
                                        text_encoder_offload)
    return allocated + reserved_extra_bytes(profile, options, sizes, dtype_bytes, use_streams, allocated, allocator,
                                            text_encoder_offload)


def balanced_split(sizes: ComponentSizes, request: RequestSize, dtype_bytes: int, options: tuple[str, ...],
                   budgets: list[int], allocator: str = "expandable") -> int:
    """Place whole components on GPUs, largest first onto the one with most room.

    Returns the predicted peak of the busiest GPU: above its budget when some component fits nowhere (it is placed
    on the GPU with the most room anyway, so the peak says by how much the placement misses).
    """
    acts = activation_bytes(sizes, request, dtype_bytes, "vae-tiling" in options)
    fp8 = "fp8-storage" in options
    items = [
        # The ControlNet shares modules with the transformer and must sit on its GPU (zimage.loader).
        ("transformer", transformer_weight_bytes(sizes, dtype_bytes, fp8)
         + controlnet_weight_bytes(sizes, dtype_bytes, fp8)),
        ("text_encoder", text_encoder_weight_bytes(sizes, dtype_bytes, "te-fp8-storage" in options)),
        ("vae", weight_bytes(sizes.vae, dtype_bytes)),
    ]
    weights_on = [0] * len(budgets)
    acts_on = [0] * len(budgets)
    share = 1 + FRAGMENTATION_SHARE[allocator]
    for name, weight in sorted(items, key=lambda item: -(item[1] + acts[item[0]])):
        room = [budgets[i] - (weights_on[i] + max(acts_on[i], acts[name]) + FIXED_OVERHEAD_BYTES) * share
                for i in range(len(budgets))]
        best = max(range(len(budgets)), key=lambda i: room[i])
        weights_on[best] += weight
        acts_on[best] = max(acts_on[best], acts[name])
    return max(int((w + a + FIXED_OVERHEAD_BYTES) * share) for w, a in zip(weights_on, acts_on))


__all__ = ["ALLOCATORS", "GIB", "predict_allocated_bytes", "predict_peak_bytes", "activation_bytes"]

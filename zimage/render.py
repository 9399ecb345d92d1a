"""The one place that calls the pipeline: encode the prompt, denoise, decode, as three separate stages.

Splitting the pipeline's own ``__call__`` into its stages gives the service what one call cannot:

* progress by stage (encoding, denoising k/n, decoding), and the stage an error happened in, which
  decides the out-of-memory step (:mod:`zimage.recovery`);
* a cancel that skips the decode: the denoising loop runs with ``output_type="latent"`` (diffusers
  0.42.1 otherwise decodes the partial latents after an interrupt), and the service decodes itself,
  only when the job was not cancelled;
* a decode retried with VAE tiling on the kept latents, without denoising again.

The calls are the pipeline's public ones (``encode_prompt``, ``__call__`` with ``prompt_embeds``,
``vae.decode``, ``image_processor.postprocess``); the decode repeats the pipeline's own three lines.
"""

from __future__ import annotations

from typing import Any, Callable

#: What the text encoder reads; longer prompts are cut by the pipeline (the service warns).
MAX_PROMPT_TOKENS = 512
#: The diffusers pipeline class of each mode; all share the loaded components.
MODE_PIPELINES = {"img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline",
                  "controlnet": "ZImageControlNetPipeline", "controlnet_inpaint": "ZImageControlNetInpaintPipeline"}
#: The modes that run the ControlNet beside the transformer.
CONTROLNET_MODES = ("controlnet", "controlnet_inpaint")
#: diffusers' default ``controlnet_conditioning_scale`` of both ControlNet pipelines (alibaba-pai's model card
#: recommends 0.65 to 0.80 for the Union ControlNet).
DEFAULT_CONTROLNET_SCALE = 0.75


def mode_pipeline(base: Any, mode: str, controlnet: Any = None) -> Any:
    """The pipeline for ``mode`` (see :data:`MODE_PIPELINES`; "text" is ``base`` itself) over ``base``'s
    components: the same module objects, so no weight is copied and their placement (device, offload hooks, fp8
    storage) is kept. The ControlNet modes also take the loaded ``controlnet``; their constructor attaches the
    transformer's embedders and refiner blocks to it (diffusers' ``ZImageControlNetModel.from_transformer``: shared
    too, not copied). Offload profiles then need :func:`zimage.loader.place_mode_pipeline` for the ControlNet.

    Built with the class's constructor from ``base.components`` (diffusers' documented way to reuse
    components), not ``from_pipe``: in diffusers 0.42.1 ``from_pipe`` ends with ``.to(dtype=...)``, float32
    unless told otherwise, which casts the *shared* modules in place (seen here: a bf16 pipeline's VAE became
    float32 and the next text-to-image call failed) and would undo fp8 storage.

    Raises ValueError for a ControlNet mode without a ``controlnet``.
    """
    if mode == "text":
        return base
    import diffusers

    extra: dict[str, Any] = {}
    if mode in CONTROLNET_MODES:
        if controlnet is None:
            raise ValueError(f"the {mode} mode needs a loaded ControlNet")
        extra["controlnet"] = controlnet
    pipe = getattr(diffusers, MODE_PIPELINES[mode])(**base.components, **extra)
    pipe.set_progress_bar_config(disable=True)  # the service reports progress itself
    return pipe


def steps_run(steps: int, strength: float | None) -> int:
    """Denoising steps (transformer calls, progress callbacks) a call runs. Image-to-image and inpainting skip the
    first ``(1 - strength)`` share of the schedule (``get_timesteps`` of the Z-Image img2img and inpaint
    pipelines); text, ControlNet and ControlNet inpainting (which has no strength: ``strength=None``) run all."""
    if strength is None:
        return steps
    return steps - int(max(steps - min(steps * strength, steps), 0))


def prompt_token_count(pipe: Any, prompt: str) -> int | None:
    """Tokens the text encoder would see for ``prompt`` with the chat template, or None without a tokenizer."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(text).input_ids)


def encode(pipe: Any, prompt: str, guidance_scale: float, negative_prompt: str = "") -> tuple[Any, Any]:
    """Prompt embeddings (and the negative prompt's when guidance is on: ``negative_prompt``, "" by default as in
    diffusers), as ``ZImagePipeline.encode_prompt`` returns them. Without guidance the negative prompt is unused."""
    import torch

    with torch.inference_mode():
        return pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=guidance_scale > 0,
                                  negative_prompt=negative_prompt if guidance_scale > 0 else None,
                                  max_sequence_length=MAX_PROMPT_TOKENS)


def embeds_nbytes(embeds: tuple[Any, Any]) -> int:
    """Bytes held by ``embeds`` as :func:`encode` returns them (two lists of tensors, the second maybe empty)."""
    return sum(t.numel() * t.element_size() for part in embeds for t in (part or ()))


def embeds_to_host(embeds: tuple[Any, Any]) -> tuple[list[Any], list[Any]]:
    """Copies of ``embeds`` in host RAM (for the prompt cache): new tensors even on the CPU, so nothing the
    pipeline does to the ones it was given can change the cached values."""
    return tuple([t.detach().to("cpu", copy=True) for t in (part or ())] for part in embeds)  # type: ignore[return-value]


def embeds_device(embeds: tuple[Any, Any]) -> str:
    """The device ``embeds`` are on (the pipeline's execution device when the text encoder made them)."""
    return str(embeds[0][0].device)


def embeds_to_device(embeds: tuple[Any, Any], device: str) -> tuple[list[Any], list[Any]]:
    """Cached ``embeds`` moved to ``device``, where the text encoder left them when they were made (see
    :func:`embeds_device`); the same values, so the pixels are those of a miss."""
    return tuple([t.to(device) for t in (part or ())] for part in embeds)  # type: ignore[return-value]


def denoise(pipe: Any, embeds: tuple[Any, Any], *, width: int, height: int, steps: int, guidance_scale: float,
            seeds: list[int], on_step: Callable[[int, int], None], should_stop: Callable[[], bool],
            image: Any = None, mask: Any = None, strength: float | None = None, control_image: Any = None,
            controlnet_conditioning_scale: float | None = None, cfg_normalization: bool = False) -> Any | None:
    """Run the denoising loop; returns the latents, or None when ``should_stop`` ended it early.

    ``pipe`` is the pipeline of the mode (:func:`mode_pipeline`): ``image`` (PIL, RGB, width x height) and
    ``strength`` for image-to-image, plus ``mask`` (PIL, L: white is repainted) for inpainting; ``control_image``
    (PIL, RGB, width x height) and ``controlnet_conditioning_scale`` (None: diffusers' 0.75) for the ControlNet
    modes, with ``image`` and ``mask`` (no strength) for ControlNet inpainting. ``cfg_normalization`` is passed to
    the pipeline when guidance is on (the base model's setting, :mod:`zimage.model_family`).
    ``on_step(step, total)`` is called after each step (1-based; ``total`` is :func:`steps_run`). One CPU
    generator per image, seeded ``seeds[i]``: image i can be reproduced on its own, on any device
    (diffusers draws the noise on the generator's device and moves it).
    """
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    prompt_embeds, negative_embeds = embeds
    stopped = False
    total = steps_run(steps, strength if image is not None and control_image is None else None)
    inputs: dict[str, Any] = {}
    if image is not None:
        inputs.update(image=image)
        if control_image is None:  # ControlNet inpainting has no strength: the masked area is repainted in full
            inputs.update(strength=strength)
    if mask is not None:
        inputs.update(mask_image=mask)
        if control_image is not None and len(seeds) > 1:
            # diffusers 0.42.1's ZImageControlNetInpaintPipeline repeats the image and the control image for
            # num_images_per_prompt but not the mask (a size mismatch in torch.cat for 2+ images): one mask per image.
            inputs.update(mask_image=[mask] * len(seeds))
    if control_image is not None:
        inputs.update(control_image=control_image, controlnet_conditioning_scale=(
            DEFAULT_CONTROLNET_SCALE if controlnet_conditioning_scale is None else controlnet_conditioning_scale))
    if guidance_scale > 0 and cfg_normalization:
        inputs.update(cfg_normalization=True)

    def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        nonlocal stopped
        on_step(step + 1, total)
        if should_stop():
            stopped = True
            pipeline._interrupt = True  # diffusers' documented early stop: the remaining steps are skipped
        return callback_kwargs

    output = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds if guidance_scale > 0 else None,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=len(seeds),
        generator=generators,
        output_type="latent",  # no decode inside the pipeline: the service decodes, unless cancelled
        callback_on_step_end=on_step_end,
        max_sequence_length=MAX_PROMPT_TOKENS,
        **inputs,
    )
    if stopped:
        return None
    return output.images


def decode(pipe: Any, latents: Any) -> Any:
    """Latents to float pixels (N, H, W, 3) in [0, 1], exactly as ``ZImagePipeline`` decodes them.

    Floats, not uint8: a NaN (the fp16 black image) is still visible here.
    """
    import torch

    vae = pipe.vae
    with torch.inference_mode():
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(scaled, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(image, output_type="np")
    # Under model offload the VAE goes back to the CPU, as at the end of the pipeline's own call.
    maybe_free = getattr(pipe, "maybe_free_model_hooks", None)
    if maybe_free is not None:
        maybe_free()
    return pixels


def to_pil(pixels: Any) -> list[Any]:
    """Float pixels (N, H, W, 3) to PIL images."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(pixels)

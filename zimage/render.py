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


def prompt_token_count(pipe: Any, prompt: str) -> int | None:
    """Tokens the text encoder would see for ``prompt`` with the chat template, or None without a tokenizer."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(text).input_ids)


def encode(pipe: Any, prompt: str, guidance_scale: float) -> tuple[Any, Any]:
    """Prompt embeddings (and the negative ones when guidance is on), as ``ZImagePipeline.encode_prompt`` returns."""
    import torch

    with torch.inference_mode():
        return pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=guidance_scale > 0,
                                  max_sequence_length=MAX_PROMPT_TOKENS)


def denoise(pipe: Any, embeds: tuple[Any, Any], *, width: int, height: int, steps: int, guidance_scale: float,
            seeds: list[int], on_step: Callable[[int, int], None], should_stop: Callable[[], bool]) -> Any | None:
    """Run the denoising loop; returns the latents, or None when ``should_stop`` ended it early.

    ``on_step(step, total)`` is called after each step (1-based). One CPU generator per image, seeded
    ``seeds[i]``: image i can be reproduced on its own, on any device (diffusers draws the noise on the
    generator's device and moves it).
    """
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    prompt_embeds, negative_embeds = embeds
    stopped = False

    def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        nonlocal stopped
        on_step(step + 1, steps)
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

"""The built-in demo model: a tiny, randomly initialised Z-Image pipeline of the real classes.

It uses exactly the classes the real Z-Image-Turbo uses (``ZImagePipeline``,
``ZImageTransformer2DModel``, transformers' ``Qwen3Model``, ``AutoencoderKL`` with 16 latent
channels and an 8x spatial factor, ``FlowMatchEulerDiscreteScheduler`` with shift 3) so that the
loader, the memory plans and the service run the same code paths as on the real weights. Only the
sizes are tiny, the weights are random (its images are noise), and the tokenizer is a small
byte-level BPE trained in memory with a Qwen-style chat template, because nothing can be downloaded.

Beside the pipeline, ``controlnet/`` holds a tiny ``ZImageControlNetModel`` (the Union 2.1 structure at the demo
transformer's size, :data:`zimage.architecture.TINY`), so that the ControlNet modes can be tried with ``--demo``.
It is not part of ``model_index.json``: the pipeline loads without it and the service loads it on its own.

Building takes a few seconds; the result is a normal diffusers folder, cached and reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump when the demo architecture changes, so an old cached folder is rebuilt, not reused.
DEMO_MODEL_VERSION = 2  # 2: a ControlNet in controlnet/
DEMO_MODEL_DIRNAME = f"demo-model-v{DEMO_MODEL_VERSION}"
#: Written last into a finished folder: a folder without it is an interrupted build.
_COMPLETE_MARKER = "zimage-demo.json"
#: The demo ControlNet's subfolder (a diffusers model folder: config.json + weights).
DEMO_CONTROLNET_DIRNAME = "controlnet"

# Qwen3's chat template reduced to what ZImagePipeline uses (user message, generation prompt,
# enable_thinking), so the pipeline formats prompts exactly as it does for the real tokenizer.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# A little mixed-language text so the BPE learns common English and Chinese byte pairs.
_TOKENIZER_CORPUS = [
    "a cat sitting on a windowsill, soft morning light, photorealistic",
    "一只猫坐在窗台上，柔和的晨光，写实风格",
    "a watercolor painting of mountains and a lake at sunset",
    "夕阳下的山和湖的水彩画",
    "portrait of an astronaut, studio lighting, 35mm, high detail",
    "city street at night in the rain, neon signs, cinematic",
    "雨夜的城市街道，霓虹灯，电影感",
    "a bowl of ramen on a wooden table, top view",
]


def demo_model_path(data_dir: Path) -> Path:
    """Where the demo model lives (or will live) under the data folder."""
    return Path(data_dir) / DEMO_MODEL_DIRNAME


def ensure_demo_model(data_dir: Path) -> Path:
    """Return the cached demo model folder, building it first if it is missing or incomplete.

    The build happens in a temporary folder beside the target and is renamed into place, so two
    processes starting at once (e.g. Supervisor with several workers) never see half a model.
    """
    target = demo_model_path(data_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        build_demo_model(staging)
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an interrupted build
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder): use theirs.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_demo_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and its ControlNet with a fixed seed and save them as a diffusers folder in
    ``out_dir`` (the ControlNet in ``controlnet/``)."""
    from .architecture import TINY, build_controlnet

    pipe = build_demo_pipeline(seed=seed)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Saved on its own, before any ControlNet pipeline attaches the transformer's modules to it.
    build_controlnet(TINY, seed=seed + 1, steer=True).save_pretrained(out_dir / DEMO_CONTROLNET_DIRNAME,
                                                                       safe_serialization=True)
    (out_dir / _COMPLETE_MARKER).write_text(
        json.dumps({"demo_model_version": DEMO_MODEL_VERSION, "seed": seed,
                    "note": "random weights: images are noise"}) + "\n",
        encoding="utf-8",
    )
    return out_dir


def build_demo_pipeline(seed: int = 0):
    """Instantiate the tiny pipeline in memory (float32, CPU)."""
    from .architecture import TINY, build_random_pipeline

    return build_random_pipeline(TINY, build_tokenizer(), seed=seed)


def build_tokenizer():
    """A byte-level BPE trained in memory, wrapped as a fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer

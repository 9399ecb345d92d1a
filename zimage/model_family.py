"""Which Z-Image model is loaded (Turbo or the non-distilled base), and the request defaults that follow from it.

Pure decisions: :func:`detect_family` takes what the loader read (the ``--model-family`` setting, the model's name,
the ``shift`` of its scheduler config) and returns the family with the reason; :func:`defaults_for` gives that
family's :class:`ModelDefaults`. Nothing here reads a file.

What tells the two apart in the files: both repositories have the same component classes and the same transformer
config (dim 3840, 30 layers); the scheduler differs. ``scheduler/scheduler_config.json`` is
``FlowMatchEulerDiscreteScheduler`` with ``"shift": 3.0`` in Tongyi-MAI/Z-Image-Turbo and ``"shift": 6.0`` in
Tongyi-MAI/Z-Image (a public description of both repositories' files, not re-checked here: no network). A folder
whose shift is neither falls back to its name, then to Turbo; ``--model-family`` overrides all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("turbo", "base")
FAMILY_CHOICES = ("auto",) + FAMILIES
#: ``shift`` in each family's published scheduler config.
SCHEDULER_SHIFT = {"turbo": 3.0, "base": 6.0}


@dataclass(frozen=True)
class ModelDefaults:
    """What a request gets when it leaves a parameter out, and what the page should offer.

    ``steps`` and ``guidance_scale`` are the defaults of a request; ``cfg_normalization`` is passed to the pipeline
    whenever guidance is on (diffusers' ``cfg_normalization``: the guided prediction's norm is capped at the
    conditional one's). ``reason`` says how the family was decided (for the log and ``plan``).
    """

    family: str  # "turbo" or "base"
    label: str  # "Z-Image-Turbo" or "Z-Image"
    name: str  # short, for messages: "Turbo" or "Z-Image base"
    steps: int
    guidance_scale: float
    negative_prompt: str
    cfg_normalization: bool
    steps_note: str  # one line for the page and --help: why this many steps
    reason: str = ""

    @property
    def uses_guidance(self) -> bool:
        """True when the default request runs classifier-free guidance (twice the transformer work per step)."""
        return self.guidance_scale > 0

    @property
    def supports_negative_prompt(self) -> bool:
        """A negative prompt takes effect only with guidance on: show its field when this is True."""
        return self.uses_guidance


#: Z-Image-Turbo: 8 steps (N steps are N transformer forwards in diffusers 0.42.1, counted in
#: tests/test_pipeline_tiny.py; the model card's ``num_inference_steps=9`` gives 8 forwards in older diffusers),
#: guidance 0 (guidance-distilled: the card sets ``guidance_scale=0.0``).
TURBO = ModelDefaults(family="turbo", label="Z-Image-Turbo", name="Turbo", steps=8, guidance_scale=0.0,
                      negative_prompt="", cfg_normalization=False, steps_note="Turbo is distilled for 8 steps")
#: Z-Image (base, not distilled): the model card recommends 28 to 50 steps (28 the fastest) and shows
#: ``guidance_scale=4``, a negative prompt and ``cfg_normalization=True`` in its example (as described publicly; not
#: re-checked here). 28 steps is the card's fast end; guidance 4.0 is the card's example value; the default
#: negative prompt is empty (the page offers the field).
BASE = ModelDefaults(family="base", label="Z-Image", name="Z-Image base", steps=28, guidance_scale=4.0,
                     negative_prompt="", cfg_normalization=True, steps_note="Z-Image (base) needs 28-50 steps")
_BY_FAMILY = {"turbo": TURBO, "base": BASE}


def detect_family(setting: str, name: str, scheduler_shift: float | None) -> tuple[str, str]:
    """(family, reason) from the ``--model-family`` setting, the model's name and its scheduler's shift.

    ``setting`` other than "auto" wins; then the scheduler's ``shift`` (3.0 Turbo, 6.0 base); then the name (the
    last part of a hub id or folder: "turbo" in it means Turbo, "Z-Image" or "Z-Image-Base" means base); else Turbo.
    """
    if setting in FAMILIES:
        return setting, f"--model-family {setting}"
    if scheduler_shift is not None:
        for family, shift in SCHEDULER_SHIFT.items():
            if abs(scheduler_shift - shift) < 1e-6:
                return family, f"its scheduler config has shift {scheduler_shift:g}, as {_BY_FAMILY[family].label}'s"
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    if "turbo" in last:
        return "turbo", f"the name {last!r} says Turbo"
    if last in ("z-image", "zimage", "z-image-base"):
        return "base", f"the name {last!r} is the base model's"
    return "turbo", "nothing in its name or scheduler config says which: assuming Turbo (set --model-family)"


def defaults_for(family: str, reason: str = "") -> ModelDefaults:
    """The :class:`ModelDefaults` of ``family`` ("turbo" or "base"), carrying ``reason``."""
    from dataclasses import replace

    return replace(_BY_FAMILY[family], reason=reason)

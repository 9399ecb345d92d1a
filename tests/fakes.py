"""Honest fakes: they record the diffusers calls a real pipeline would receive, or wrap a real one."""

from __future__ import annotations

from typing import Any

import torch


class RecordingVae:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.tile_sample_min_size = 1024
        self.tile_latent_min_size = 128

    def enable_tiling(self) -> None:
        self.calls.append(("vae.enable_tiling",))


class RecordingTransformer:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def enable_layerwise_casting(self, **kwargs: Any) -> None:
        self.calls.append(("transformer.enable_layerwise_casting", kwargs))


class RecordingPipeline:
    """Stands in for ZImagePipeline where the real call needs a GPU; records what was called."""

    def __init__(self) -> None:
        self.calls: list = []
        self.vae = RecordingVae(self.calls)
        self.transformer = RecordingTransformer(self.calls)

    def to(self, device: Any) -> "RecordingPipeline":
        self.calls.append(("to", str(device)))
        return self

    def enable_model_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("enable_model_cpu_offload", kwargs))

    def enable_sequential_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("enable_sequential_cpu_offload", kwargs))

    def enable_group_offload(self, **kwargs: Any) -> None:
        self.calls.append(("enable_group_offload", kwargs))

    def enable_attention_slicing(self) -> None:
        self.calls.append(("enable_attention_slicing",))

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class WrappedPipeline:
    """A real pipeline behind a hook that can fail or alter calls, as a GPU would."""

    def __init__(self, pipe: Any, behaviour: Any) -> None:
        self._pipe = pipe
        self._behaviour = behaviour
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        return self._behaviour(self, kwargs)


def oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(message)


class VaeProxy:
    """The real VAE behind a hook on ``decode`` (to fail it, or count it); everything else is the real one."""

    def __init__(self, vae: Any, behaviour: Any = None) -> None:
        self._vae = vae
        self._behaviour = behaviour
        self.decodes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "decodes":
            object.__setattr__(self, name, value)
        else:  # tile sizes and the like belong to the real VAE
            setattr(self._vae, name, value)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self.decodes += 1
        if self._behaviour is not None:
            self._behaviour(self)
        return self._vae.decode(*args, **kwargs)


def wrap_vae(pipe: Any, behaviour: Any = None) -> VaeProxy:
    """Put a :class:`VaeProxy` on a :class:`WrappedPipeline` (instance attribute wins over ``__getattr__``)."""
    proxy = VaeProxy(pipe._pipe.vae, behaviour)
    pipe.vae = proxy
    return proxy

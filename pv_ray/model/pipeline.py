"""The video pipeline, in the diffusers sense: a backbone with its identity adapter (and, where the
family has them, style LoRAs and control); calling it generates a video.

The CLI's `generate`, serving's replicas, evaluation, the contact sheet and tuning each hold one
pipeline per process and swap identities into it in place (`use_identity`): the backbone and the
adapter are assembled here, once, for all of them. The injected adapter is sized for every
adapter it will hold (`for_adapters`: the largest rank; cross-attention layers if any has them),
since a swap is a copy into existing layers, never a re-injection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from pv_ray.config import AdapterConfig
from pv_ray.model.adapter import IdentityAdapter, fitting_config
from pv_ray.model.protocol import SampleSpec, VideoBackbone
from pv_ray.model.sampling import generate
from pv_ray.storage.adapter_folder import LoraWeights


class VideoPipeline:
    """A backbone and one injected identity adapter; `__call__` generates with whichever identity
    it holds (or the base model inside `base_model()`)."""

    def __init__(self, backbone: VideoBackbone, adapter: IdentityAdapter):
        self.backbone = backbone
        self.adapter = adapter

    @classmethod
    def for_adapters(
        cls,
        backbone: VideoBackbone,
        cfg: AdapterConfig,
        recorded: Iterable[Mapping[str, Any]] = (),
        *,
        cross_attention: bool = False,
        slots: int = 1,
    ) -> VideoPipeline:
        """A pipeline whose injected adapter (`cfg`, widened) holds every adapter it will run: the
        `recorded` adapter sections of their adapter.json give their ranks and whether they adapt
        cross-attention (`cross_attention` asks for those layers regardless). `slots` > 1 for
        batched tuning."""
        recorded = list(recorded)
        injected = fitting_config(
            cfg,
            ranks=[r["rank"] for r in recorded if isinstance(r.get("rank"), int)],
            cross_attention=cross_attention or any(r.get("cross_attention") is True for r in recorded),
        )
        return cls(backbone, IdentityAdapter.on(backbone, injected, slots=slots))

    def use_identity(self, weights: LoraWeights, active_fraction: float) -> None:
        """Swap an identity's weights in (checked first: a bad file leaves the adapter as it was),
        with the isolation window it was tuned with."""
        self.adapter.load_weights(weights)
        self.adapter.use_window(active_fraction)

    @contextmanager
    def base_model(self) -> Iterator[None]:
        """Generate with the base model inside this block (the adapter off at every step)."""
        with self.adapter.disabled():
            yield

    def __call__(
        self,
        prompt: str,
        spec: SampleSpec,
        *,
        seed: int,
        negative_prompt: str = "",
        on_step: Callable[[int, int], None] | None = None,
        control: Any = None,
    ) -> torch.Tensor:
        """A video for `prompt`: frames (F, 3, H, W) float32 in [-1, 1]. Same seed, same frames."""
        return generate(
            self.backbone, prompt, spec, seed=seed, negative_prompt=negative_prompt, on_step=on_step, control=control
        )

"""Denoising timesteps and the isolation window, in plain Python.

The config validation, the tuner and the adapter's UNet hook all count the window with these
functions, so a config that would leave the adapter without a gradient step is refused when it
loads, with the same numbers the tuner would use. `spaced_timesteps` is DDIMScheduler's (and
EulerDiscreteScheduler's) `set_timesteps` (diffusers 0.42) written out, `lcm_timesteps`
LCMScheduler's, `flow_timesteps` the flow-matching UniPCMultistepScheduler's (Wan); tests hold
them equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SD_TRAIN_TIMESTEPS = 1000  # num_train_timesteps of SD1.5 and every AnimateDiff backbone
SD_STEPS_OFFSET = 1
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation's step grid


class IsolationWindow:
    """Which timesteps the adapter is active at: t < active_fraction * num_train_timesteps."""

    def __init__(self, active_fraction: float, num_train_timesteps: int = SD_TRAIN_TIMESTEPS):
        self.active_fraction = active_fraction
        self.threshold = active_fraction * num_train_timesteps

    def is_active(self, timestep: float) -> bool:
        return self.active_fraction >= 1.0 or timestep < self.threshold

    def count(self, timesteps: Sequence[float]) -> int:
        """How many of `timesteps` fall inside the window."""
        return sum(self.is_active(float(t)) for t in timesteps)

    def misses_gradient_steps(self, timesteps: Sequence[float], grad_steps: int) -> str | None:
        """Why a rollout over `timesteps`, with gradients through its last `grad_steps` steps, would
        leave the adapter without a gradient (some of those steps fall outside the window), or None.
        The config check and the tuner both ask this, on the same numbers."""
        in_window = self.count(timesteps[-grad_steps:])
        if in_window >= grad_steps:
            return None
        return (
            f"timesteps {'/'.join(f'{float(t):g}' for t in timesteps)} put {in_window} of the last {grad_steps} "
            f"step(s) (train.grad_steps) inside the isolation window t < {self.threshold:g} "
            f"(adapter.active_fraction={self.active_fraction}): the adapter would get no gradient"
        )


def spaced_timesteps(
    num_steps: int,
    spacing: str,
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
    steps_offset: int = SD_STEPS_OFFSET,
) -> list[int]:
    """The descending timesteps a DDIM scheduler samples at for `num_steps` steps."""
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        steps = (np.arange(0, num_steps) * (num_train_timesteps // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (linspace, leading or trailing)")
    return [int(t) for t in steps.astype(np.int64)]


def lcm_timesteps(num_steps: int, num_train_timesteps: int = SD_TRAIN_TIMESTEPS) -> list[int]:
    """The descending timesteps an LCM scheduler samples at: evenly spaced picks from the
    distillation's grid of LCM_ORIGINAL_STEPS steps (its own spacing; timestep_spacing is ignored)."""
    k = num_train_timesteps // LCM_ORIGINAL_STEPS
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
    if not 1 <= num_steps <= LCM_ORIGINAL_STEPS:
        raise ValueError(f"an LCM scheduler samples 1..{LCM_ORIGINAL_STEPS} steps, got {num_steps}")
    picks = np.floor(np.linspace(0, len(grid), num=num_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[picks]]


def flow_timesteps(num_steps: int, shift: float, num_train_timesteps: int = SD_TRAIN_TIMESTEPS) -> list[int]:
    """The descending timesteps a flow-matching UniPC scheduler (Wan's sampler: `use_flow_sigmas`,
    `flow_shift`) samples at: sigmas evenly spaced from 1, shifted by `shift` (larger: more steps
    at high noise), times the training schedule's length."""
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas[0] = min(sigmas[0], 1 - 1e-6)  # as diffusers: keeps the first update's log finite
    return [int(t) for t in (sigmas * num_train_timesteps).astype(np.int64)]


def sampler_timesteps(sampler: str, num_steps: int, spacing: str, shift: float = 1.0) -> list[float]:
    """The timesteps of `sampler` (model.scheduler: ddim, euler, lcm, or unipc with the flow
    `shift`) for `num_steps` steps."""
    if sampler == "unipc":
        return [float(t) for t in flow_timesteps(num_steps, shift)]
    if sampler == "lcm":
        return [float(t) for t in lcm_timesteps(num_steps)]
    if sampler == "euler" and spacing == "linspace":  # Euler keeps these unrounded
        return [float(t) for t in np.linspace(0, SD_TRAIN_TIMESTEPS - 1, num_steps)[::-1]]
    return [float(t) for t in spaced_timesteps(num_steps, spacing)]

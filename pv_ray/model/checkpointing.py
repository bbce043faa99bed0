"""Gradient checkpointing of whole denoiser blocks, the ones the backbone names.

diffusers' own switch (`enable_gradient_checkpointing`) recomputes only the ResNets of the motion
UNet's blocks; the spatial transformers and the motion modules stay stored. Here a whole block
(on AnimateDiff: ResNets, transformers, motion modules) keeps only its inputs and runs again in
the backward: two thirds of the saved activations go (diffusers' switch: a third), for one more
forward of those blocks. Which blocks `train.gradient_checkpointing` (False, True, "outer") means
is the family's (`VideoBackbone.checkpoint_blocks`): AnimateDiff's "outer" is the two blocks at
full latent resolution, a third of the activations for 38% of the recomputation
(docs/BENCHMARKS.md, sections 2 and 5).

The recomputed forwards must see the adapter as the first ones did: the tuner holds the
adapter's sample routing over the backward, and every gradient step lies inside the isolation
window (the config and the tuner refuse other rollouts), so the window is the same for each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint


@contextmanager
def checkpointed_blocks(blocks: list[torch.nn.Module]) -> Iterator[list[torch.nn.Module]]:
    """Inside this block, `blocks` (`VideoBackbone.checkpoint_blocks`) recompute their forward in the backward."""
    for block in blocks:
        block.forward = partial(_recomputed, block.forward)  # an instance attribute over the class's
    try:
        yield blocks
    finally:
        for block in blocks:
            del block.forward


def _recomputed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)

"""Gradient checkpointing of whole UNet blocks, everywhere or only at full latent resolution.

diffusers' own switch (`enable_gradient_checkpointing`) recomputes only the ResNets of the motion
UNet's blocks; the spatial transformers and the motion modules stay stored. Here a whole block
(ResNets, transformers, motion modules) keeps only its inputs and runs again in the backward:
two thirds of the saved activations go (diffusers' switch: a third), for one more forward of
those blocks. "outer" does that only for the two blocks at full latent resolution, the first
down block and the last up block: a third of the activations for 38% of the recomputation
(docs/BENCHMARKS.md, sections 2 and 5), a middle setting for a card where everything stored
does not fit and full checkpointing costs more time than needed.

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


def checkpointed_blocks_of(unet: torch.nn.Module, which: bool | str) -> list[torch.nn.Module]:
    """The blocks `train.gradient_checkpointing` names: none (False), all (True) or "outer"."""
    if which is False:
        return []
    if which == "outer":
        return [unet.down_blocks[0], unet.up_blocks[-1]]
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


@contextmanager
def checkpointed_blocks(unet: torch.nn.Module, which: bool | str) -> Iterator[list[torch.nn.Module]]:
    """Inside this block, the chosen blocks of `unet` recompute their forward in the backward."""
    blocks = checkpointed_blocks_of(unet, which)
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

"""Several identities per rollout (train.identities_per_batch): each sample carries its own
identity's LoRA weights, prompts, noise and optimiser state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import ImageOps
from safetensors.torch import load_file

from pv_ray.config import load_config
from pv_ray.method.personalizer import IdentityInput, Personalizer
from pv_ray.presets.demo import demo_photos
from pv_ray.prompts import IdentityMeta

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.steps=4", "train.seed=3"]
PEOPLE = (("astronaut", "woman"), ("tom-hanks", "man"), ("group-person-1", "person"))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def tune_together(personalizer: Personalizer, images: dict, out: Path) -> list:
    items = [
        IdentityInput(i, personalizer.reference({f"{i}.png": png(images[i])}), out / i, IdentityMeta(class_word=c))
        for i, c in PEOPLE
    ]
    return personalizer.personalize_many(items, evaluate=False)


@pytest.fixture(scope="module")
def together(tmp_path_factory, tiny_models):
    """The three identities tuned in one batched rollout, and once more with the third one's photo
    replaced by another person's."""
    images = {i: p for i, (p, _) in demo_photos().items()}
    personalizer = Personalizer(load_config(TINY, [*FAST, "train.identities_per_batch=3"]))
    out = tmp_path_factory.mktemp("together")
    first = tune_together(personalizer, images, out / "first")
    changed = images | {"group-person-1": ImageOps.mirror(images["group-person-2"])}
    second = tune_together(personalizer, changed, out / "second")
    return images, first, second, out


def test_identities_tuned_together_get_the_adapter_each_gets_alone(together, tmp_path):
    images, first, _, out = together
    personalizer = Personalizer(load_config(TINY, FAST))
    for (identity_id, class_word), batched in zip(PEOPLE, first):
        reference = personalizer.reference({f"{identity_id}.png": png(images[identity_id])})
        alone = personalizer.personalize(
            identity_id, reference, tmp_path / identity_id, meta=IdentityMeta(class_word=class_word), evaluate=False
        )
        assert [m.prompt for m in batched.history] == [m.prompt for m in alone.history], "its own prompts"
        assert [m.loss for m in batched.history] == pytest.approx([m.loss for m in alone.history], rel=1e-4, abs=1e-6)
        together_weights, alone_weights = weights(batched.adapter_dir), weights(alone.adapter_dir)
        assert together_weights.keys() == alone_weights.keys()
        # Batched float32 kernels add up in another order; AdamW's first steps (g / |g|) turn the last
        # bits of a near-zero gradient into up to ~1e-5 (measured 2.1e-5 at 4 steps, weights ~0.19).
        for key in alone_weights:
            assert torch.allclose(together_weights[key], alone_weights[key], rtol=1e-3, atol=1e-4), (identity_id, key)
        assert any(t.abs().sum() > 0 for k, t in alone_weights.items() if ".lora.up." in k), "training changed it"
    assert len({p for r in first for p in (m.prompt for m in r.history)}) > 4, "the identities' prompts differ"


def test_each_identity_learns_from_its_own_samples_only(together):
    """Replacing the third identity's photo changes its adapter and nothing of the other two."""
    _, first, second, _ = together
    for a, b in zip(first[:2], second[:2]):
        wa, wb = weights(a.adapter_dir), weights(b.adapter_dir)
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-4) for k in wa), a.identity_id
    third_a, third_b = weights(first[2].adapter_dir), weights(second[2].adapter_dir)
    assert max(float((third_a[k] - third_b[k]).abs().max()) for k in third_a) > 1e-3, "its own photo moves it"


def test_diverging_identities_stop_alone_and_the_last_one_still_learns(together, tmp_path):
    """The first two identities' NaN losses stop them at step 1; the third, left alone in slot 2,
    gets the adapter it gets in the full batch (its samples still routed to its own slot)."""
    images, first, _, _ = together
    personalizer = Personalizer(load_config(TINY, [*FAST, "train.identities_per_batch=3"]))
    items = [
        IdentityInput(i, personalizer.reference({f"{i}.png": png(images[i])}), tmp_path / i, IdentityMeta(class_word=c))
        for i, c in PEOPLE
    ]
    for item in items[:2]:
        item.reference.embedding = item.reference.embedding * float("nan")  # its loss is NaN from step 1
    results = personalizer.personalize_many(items, evaluate=False)
    assert all(str(r).startswith("diverged at step 1: loss nan") for r in results[:2])
    assert not (tmp_path / "astronaut").exists() and not (tmp_path / "tom-hanks").exists()
    assert len(results[2].history) == 4
    alone, batched = weights(results[2].adapter_dir), weights(first[2].adapter_dir)
    assert all(torch.allclose(alone[k], batched[k], rtol=1e-3, atol=1e-4) for k in alone)


@pytest.mark.parametrize("checkpointing", ["true", "outer"])
def test_gradient_checkpointing_routes_the_recomputed_forwards_to_their_slots(together, tmp_path, checkpointing):
    """With gradient checkpointing the backward recomputes whole blocks' forwards, LoRA layers
    included: the samples must reach their own slots then too, so the adapters equal those tuned
    without it."""
    images, first, _, _ = together
    overrides = [*FAST, "train.identities_per_batch=3", f"train.gradient_checkpointing={checkpointing}"]
    checkpointed = tune_together(Personalizer(load_config(TINY, overrides)), images, tmp_path)
    for a, b in zip(first, checkpointed):
        wa, wb = weights(a.adapter_dir), weights(b.adapter_dir)
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-4) for k in wa), a.identity_id

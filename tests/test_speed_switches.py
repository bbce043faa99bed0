"""The switches that make tuning and serving fast (issue 18): distilled few-step samplers run
CFG-free (model.scheduler), whole-block gradient checkpointing (train.gradient_checkpointing),
channels_last, and a compiled UNet whose adapters still hot-swap."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from pv_ray.config import load_config
from pv_ray.method.personalizer import Personalizer
from pv_ray.model.checkpointing import checkpointed_blocks
from pv_ray.model.sampling import SampleSpec, generate
from pv_ray.presets.demo import demo_photos
from pv_ray.prompts import IdentityMeta
from pv_ray.storage.adapter_folder import LoraWeights

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tune_one(personalizer: Personalizer, out: Path):
    photo = demo_photos()["tom-hanks"][0]
    reference = personalizer.reference({"tom-hanks.png": png(photo)})
    return personalizer.personalize(
        "tom-hanks", reference, out, meta=IdentityMeta(class_word="man"), evaluate=False
    ).history


@pytest.mark.parametrize(
    ("scheduler", "extra"),
    [
        ("EulerDiscreteScheduler", ["model.scheduler=euler"]),
        ("LCMScheduler", ["model.scheduler=lcm", "adapter.active_fraction=0.3"]),
    ],
)
def test_a_distilled_few_step_sampler_tunes_cfg_free_and_serves_the_same_way(tmp_path, tiny_models, scheduler, extra):
    """With lambda_scr on, step 1's adapted rollout (LoRA up weights still zero) equals the base
    rollout only if both drew the same between-step noise (LCM draws some): its loss is 0 then."""
    cfg = load_config(TINY, [*extra, "train.steps=2", "train.guidance_scale=1.0", "train.lambda_scr=1.0"])
    personalizer = Personalizer(cfg)
    assert type(personalizer.backbone.scheduler).__name__ == scheduler
    history = tune_one(personalizer, tmp_path / "adapter")
    assert all(torch.isfinite(torch.tensor([m.loss, m.grad_norm])).all() and m.grad_norm > 0 for m in history)
    assert history[0].loss_scr == 0.0
    spec = SampleSpec(4, 64, 64, 4, 1.0)
    first, again, other = (generate(personalizer.backbone, "a man", spec, seed=s) for s in (7, 7, 8))
    assert torch.isfinite(first).all() and torch.equal(first, again) and not torch.equal(first, other)


def saved_bytes_and_grads(personalizer: Personalizer, which) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward of one UNet forward (unique storages), and the LoRA
    gradients, with `which` blocks checkpointed."""
    backbone, adapter = personalizer.backbone, personalizer.adapter
    params = adapter.parameters()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=gen)  # nonzero up weights: every LoRA weight gets a gradient
    sample = torch.randn(1, 4, 4, 16, 16, generator=gen)
    embeds = backbone.encode_prompts(["a man"]).repeat_interleave(4, dim=0)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for p in params:
        p.requires_grad_(True)
    try:
        with (
            checkpointed_blocks(backbone.checkpoint_blocks(which)),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = backbone.unet(sample, torch.tensor(100), encoder_hidden_states=embeds).sample
        grads = torch.autograd.grad(out.square().mean(), params)
    finally:
        for p in params:
            p.requires_grad_(False)
    return sum(storages.values()), grads


def test_whole_block_checkpointing_keeps_less_and_gives_the_same_gradients(tiny_models):
    personalizer = Personalizer(load_config(TINY))
    kept = {which: saved_bytes_and_grads(personalizer, which) for which in (False, "outer", True)}
    assert kept[False][0] > kept["outer"][0] > kept[True][0], {k: v[0] for k, v in kept.items()}
    assert kept[True][0] < 0.5 * kept[False][0]
    for which in ("outer", True):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(kept[False][1], kept[which][1]))
    assert not hasattr(personalizer.backbone.unet.down_blocks[0].forward, "func"), "the class's forward is back"


def test_channels_last_tunes_as_the_default_layout(tmp_path, tiny_models):
    default = tune_one(Personalizer(load_config(TINY, ["train.steps=2"])), tmp_path / "a")
    personalizer = Personalizer(load_config(TINY, ["train.steps=2", "model.channels_last=true"]))
    assert personalizer.backbone.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert personalizer.backbone.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = tune_one(personalizer, tmp_path / "b")
    assert [m.loss for m in nhwc] == pytest.approx([m.loss for m in default], rel=1e-4)


def random_adapter(personalizer: Personalizer, seed: int, rank: int, alpha: float) -> LoraWeights:
    gen, state = torch.Generator().manual_seed(seed), {}
    for name, layer in personalizer.adapter.layers.items():
        down, up = layer.lora_A["identity"].weight, layer.lora_B["identity"].weight
        state[f"unet.{name}.lora.down.weight"] = 0.3 * torch.randn(rank, down.shape[1], generator=gen)
        state[f"unet.{name}.lora.up.weight"] = 0.3 * torch.randn(up.shape[0], rank, generator=gen)
    return LoraWeights(state, rank, alpha)


def test_a_compiled_unet_hot_swaps_adapters_without_recompiling(tiny_models):
    """The first video compiles the UNet (isolation window off and on); adapters of other ranks
    and alphas then run on those graphs with any recompilation an error. Each video equals the
    eager one with the same adapter."""
    torch.compiler.reset()
    adapters = [(1, 8, 8.0), (2, 4, 2.0), (3, 8, 16.0)]
    spec = SampleSpec(4, 64, 64, 4, 1.0)
    compiled = Personalizer(load_config(TINY, ["model.compile=true"]))
    videos = []
    for k, (seed, rank, alpha) in enumerate(adapters):
        compiled.adapter.load_weights(random_adapter(compiled, seed, rank, alpha))
        with torch.compiler.set_stance("fail_on_recompile" if k else "default"):
            videos.append(generate(compiled.backbone, "a man", spec, seed=0))
    eager = Personalizer(load_config(TINY))
    for (seed, rank, alpha), video in zip(adapters, videos):
        eager.adapter.load_weights(random_adapter(eager, seed, rank, alpha))
        difference = float((generate(eager.backbone, "a man", spec, seed=0) - video).abs().max())
        assert difference < 1e-3, (rank, alpha, difference)  # inductor fuses float32 ops in another order
    assert not torch.allclose(videos[0], videos[1], atol=1e-2), "the adapters differ"
    torch.compiler.reset()


def test_a_compiled_unet_tunes_as_the_eager_one(tmp_path, tiny_models):
    """model.compile in tuning: the backward runs through the compiled forward and through the
    recomputed outer blocks (gradient checkpointing), and the steps match eager ones."""
    torch.compiler.reset()
    overrides = ["train.steps=3", "train.gradient_checkpointing=outer"]
    eager = tune_one(Personalizer(load_config(TINY, overrides)), tmp_path / "eager")
    compiled = tune_one(Personalizer(load_config(TINY, [*overrides, "model.compile=true"])), tmp_path / "compiled")
    torch.compiler.reset()
    assert [m.grad_norm for m in compiled] == pytest.approx([m.grad_norm for m in eager], rel=1e-3)
    assert [m.loss for m in compiled] == pytest.approx([m.loss for m in eager], rel=1e-3)
    assert all(m.grad_norm > 0 for m in compiled)

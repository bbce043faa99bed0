"""The backbone, the spatial identity adapter and its isolation window, on the tiny preset."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from pv_ray.backbones import load_backbone, model_paths
from pv_ray.config import AdapterConfig, ModelConfig
from pv_ray.model.adapter import ADAPTER_NAME, IdentityAdapter
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone as Backbone
from pv_ray.model.loading import ModelFolderError
from pv_ray.model.sampling import SampleSpec, generate
from pv_ray.presets.tiny import build_tiny_models
from pv_ray.storage.adapter_folder import AdapterFileError, AdapterFolder, LoraWeights

SPEC = SampleSpec(num_frames=4, height=64, width=64, num_inference_steps=4, guidance_scale=7.5)
PROMPT = "a person smiling on a beach"


@pytest.fixture(scope="module")
def loaded(tiny_models: Path) -> Backbone:
    return load_backbone(ModelConfig(base=str(tiny_models)))


@pytest.fixture
def backbone(loaded: Backbone) -> Backbone:
    """The loaded backbone with a private UNet copy, so adapters never leak between tests."""
    return dataclasses.replace(loaded, unet=copy.deepcopy(loaded.unet))


def randomize(adapter: IdentityAdapter, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture
def adapter(backbone: Backbone):
    def make(**kw) -> IdentityAdapter:
        return IdentityAdapter.on(backbone, AdapterConfig(rank=4, alpha=4, **kw))

    return make


def test_same_seed_same_frames_and_adapter_changes_them(backbone, adapter):
    base = generate(backbone, PROMPT, SPEC, seed=0)
    assert base.shape == (4, 3, 64, 64)
    assert torch.equal(base, generate(backbone, PROMPT, SPEC, seed=0))
    assert not torch.equal(base, generate(backbone, PROMPT, SPEC, seed=1))

    a = adapter(active_fraction=1.0)
    assert torch.equal(base, generate(backbone, PROMPT, SPEC, seed=0)), "a fresh adapter must be a no-op (B = 0)"
    randomize(a, 0)
    adapted = generate(backbone, PROMPT, SPEC, seed=0)
    assert (adapted - base).abs().max() > 1e-2
    with a.disabled():
        assert torch.equal(base, generate(backbone, PROMPT, SPEC, seed=0))


def test_lora_only_in_spatial_attention(backbone, adapter):
    a = adapter(cross_attention=True)
    names = [n for n, m in backbone.unet.named_modules() if hasattr(m, "lora_A") and ADAPTER_NAME in m.lora_A]
    assert names and set(names) == set(a.layers)
    for n in names:
        assert "motion_modules" not in n
        assert ".attentions." in n and ".transformer_blocks." in n
        assert n.rsplit(".", 2)[-2] in ("attn1", "attn2") or ".to_out.0" in n
    # every spatial self-attention projection is adapted; no temporal one is
    spatial_q = [n for n, _ in backbone.unet.named_modules() if n.endswith("attn1.to_q") and "motion_modules" not in n]
    assert {n for n in names if n.endswith("attn1.to_q")} == set(spatial_q)
    assert any("motion_modules" in n for n, _ in backbone.unet.named_modules()), "the backbone has temporal layers"


def test_self_attention_only_by_default(backbone, adapter):
    a = adapter()
    assert a.layers and all(".attn1." in n for n in a.layers)


def test_window_leaves_early_timesteps_untouched(backbone, adapter):
    a = adapter(active_fraction=0.25)
    randomize(a, 1)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 4, 8, 8, generator=gen)  # (B, C, F, h, w)
    emb = backbone.encode_prompts([PROMPT]).repeat_interleave(4, 0)

    def unet_out(t: int, enabled: bool) -> torch.Tensor:
        a.enabled = enabled
        with torch.no_grad():
            return backbone.unet(latents, torch.tensor(t), encoder_hidden_states=emb).sample

    early, late = 900, 100  # window: t < 0.25 * 1000
    assert torch.equal(unet_out(early, True), unet_out(early, False))
    assert (unet_out(late, True) - unet_out(late, False)).abs().max() > 1e-3
    a.enabled = True


def test_saved_adapter_loads_in_plain_diffusers_and_frames_match(tmp_path, tiny_models, backbone, adapter):
    from diffusers import AnimateDiffPipeline

    a = adapter(active_fraction=1.0)
    randomize(a, 2)
    path = AdapterFolder(tmp_path / "alice").write(a.weights())
    assert path.name == "pytorch_lora_weights.safetensors"
    read = LoraWeights.read(tmp_path / "alice")
    assert (read.rank, read.alpha, read.peft_config["target_modules"]) == (4, 4.0, a.target_modules)
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in read.tensors)
    assert read.to_bytes() == path.read_bytes(), "written and read back, the same bytes"
    ours = generate(backbone, PROMPT, SPEC, seed=3)

    pipe = AnimateDiffPipeline.from_pretrained(tiny_models)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "alice", adapter_name="alice")
    out = pipe(
        PROMPT,
        num_frames=SPEC.num_frames,
        height=SPEC.height,
        width=SPEC.width,
        num_inference_steps=SPEC.num_inference_steps,
        guidance_scale=SPEC.guidance_scale,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).frames[0]
    assert (out - (ours / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-4
    pipe.unload_lora_weights()
    plain = pipe(
        PROMPT,
        num_frames=4,
        height=64,
        width=64,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).frames[0]
    assert (out - plain).abs().max() > 1e-2, "the LoRA must have had an effect in plain diffusers"


def test_hotswap_in_place_matches_and_reset(tmp_path, backbone, adapter):
    a = adapter(active_fraction=1.0)
    ids_before = {n: id(m) for n, m in a.layers.items()}
    randomize(a, 10)
    AdapterFolder(tmp_path / "a").write(a.weights())
    frames_a = generate(backbone, PROMPT, SPEC, seed=0)
    randomize(a, 11)
    AdapterFolder(tmp_path / "b").write(a.weights())
    frames_b = generate(backbone, PROMPT, SPEC, seed=0)
    assert not torch.equal(frames_a, frames_b)
    a.load_weights(LoraWeights.read(tmp_path / "a"))
    assert torch.allclose(generate(backbone, PROMPT, SPEC, seed=0), frames_a, atol=1e-6)
    a.load_weights(LoraWeights.read(tmp_path / "b"))
    assert torch.allclose(generate(backbone, PROMPT, SPEC, seed=0), frames_b, atol=1e-6)
    assert {n: id(m) for n, m in backbone.unet.named_modules() if n in ids_before} == ids_before, "no re-injection"

    a.reset(seed=5)
    first = [p.clone() for p in a.parameters()]
    a.reset(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(first, a.parameters()))
    assert all(float(m.lora_B[ADAPTER_NAME].weight.abs().sum()) == 0 for m in a.layers.values())
    assert torch.equal(generate(backbone, PROMPT, SPEC, seed=0), generate(backbone, PROMPT, SPEC, seed=0))


def test_swap_pads_smaller_ranks_clears_uncovered_layers_and_is_atomic(tmp_path, backbone, adapter):
    from safetensors.torch import save_file

    a = adapter()
    randomize(a, 10)
    names = list(a.layers)
    gen = torch.Generator().manual_seed(0)
    small = {}
    for name in names[:2]:  # a rank-2 file with alpha 3 that covers only two of the layers
        layer = a.layers[name]
        small[f"unet.{name}.lora.down.weight"] = torch.randn(2, layer.in_features, generator=gen)
        small[f"unet.{name}.lora.up.weight"] = torch.randn(layer.out_features, 2, generator=gen)
    a.load_weights(LoraWeights(small, rank=2, alpha=3.0))
    for name in names:
        layer = a.layers[name]
        delta = layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight * layer.scaling[ADAPTER_NAME]
        if name in names[:2]:
            expected = small[f"unet.{name}.lora.up.weight"] @ small[f"unet.{name}.lora.down.weight"] * 1.5
        else:
            expected = torch.zeros_like(delta)  # nothing of the previous identity lingers
        assert torch.allclose(delta, expected, atol=1e-5), name

    randomize(a, 11)
    before = {k: v.clone() for k, v in a.weights().tensors.items()}
    bad = dict(small)
    bad[f"unet.{names[1]}.lora.up.weight"] = torch.zeros(7, 2)  # wrong out_features, after a good key
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterFileError, match=r"has shape \(7, 2\), expected"):
        a.check_fits(LoraWeights(bad, rank=2, alpha=2.0))  # what the serving replica checks before caching an adapter
    with pytest.raises(AdapterFileError, match="rank 8 exceeds"):
        a.check_fits(LoraWeights(small, rank=8, alpha=8.0))
    a.check_fits(LoraWeights(small, rank=2, alpha=2.0))
    with pytest.raises(AdapterFileError, match=r"has shape \(7, 2\), expected"):
        a.load_weights(LoraWeights.read(tmp_path / "bad.safetensors"))
    after = a.weights().tensors
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused file must leave the adapter as it was"


def test_bad_adapter_files_are_refused(tmp_path, backbone, adapter):
    a = adapter()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        LoraWeights.read(tmp_path / "junk")
    with pytest.raises(AdapterFileError, match="no adapter file"):
        LoraWeights.read(tmp_path / "missing")
    from safetensors.torch import save_file

    # a rank-8 file cannot go into a rank-4 adapter

    name = next(iter(a.layers))
    save_file(
        {f"unet.{name}.lora.down.weight": torch.zeros(8, 32), f"unet.{name}.lora.up.weight": torch.zeros(32, 8)},
        str(tmp_path / "r8.safetensors"),
    )
    with pytest.raises(AdapterFileError, match="rank 8 exceeds"):
        a.load_weights(LoraWeights.read(tmp_path / "r8.safetensors"))
    save_file({"unet.motion_modules.0.lora.down.weight": torch.zeros(4, 32)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AdapterFileError, match="does not match"):
        a.load_weights(LoraWeights.read(tmp_path / "wrong.safetensors"))


def test_tiny_models_are_seeded_and_complete(tmp_path, tiny_models):
    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".complete"
        }

    again = build_tiny_models(tmp_path / "again", seed=0)
    expected = digest(tiny_models)
    assert digest(again) == expected
    for part in (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "motion_adapter/config.json",
    ):
        assert part in expected
    assert any(k.startswith("tokenizer/") for k in expected) and any(
        k.startswith("faces/") and k.endswith(".onnx") for k in expected
    )
    other = digest(build_tiny_models(tmp_path / "other", seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != expected["unet/diffusion_pytorch_model.safetensors"]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="model.base folder not found"):
        model_paths(ModelConfig(base=str(tmp_path / "nope")))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelFolderError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        model_paths(ModelConfig(base=str(tmp_path / "half")))


def test_every_attention_runs_on_sdpa(backbone, adapter):
    """No eager attention anywhere: the UNet's spatial and motion attention and the VAE's go
    through torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0), with the identity
    adapter injected; the text encoder uses transformers' SDPA implementation."""
    unet = {type(p).__name__ for p in backbone.unet.attn_processors.values()}
    assert unet == {"AttnProcessor2_0"} and any("motion_modules" in k for k in backbone.unet.attn_processors)
    assert {type(p).__name__ for p in backbone.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    assert backbone.text_encoder.config._attn_implementation == "sdpa"

"""An identity adapter in the kohya/A1111 key format, as ComfyUI and A1111 load it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pv_ray.backbones import load_backbone
from pv_ray.config import load_config
from pv_ray.model.adapter import IdentityAdapter
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone as Backbone
from pv_ray.model.animatediff.kohya_export import kohya_lora_bytes
from pv_ray.storage.adapter_folder import AdapterFolder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PV_RAY = str(Path(sys.executable).with_name("pv-ray"))
# alpha != rank, so a converter that writes alpha = rank (diffusers' own does) changes the output.
OVERRIDES = ["adapter.rank=4", "adapter.alpha=2", "adapter.cross_attention=true"]


def unet_output(backbone: Backbone, timestep: int) -> torch.Tensor:
    latents = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = backbone.encode_prompts(["a person walking"]).repeat_interleave(2, 0)
    with torch.no_grad():
        return backbone.unet(latents, timestep, encoder_hidden_states=embeds).sample


@pytest.fixture(scope="module")
def adapted(tiny_models, tmp_path_factory):
    """The tiny backbone with a random identity adapter, saved as pv-ray saves one."""
    cfg = load_config(TINY, OVERRIDES)
    backbone = load_backbone(cfg.model)
    adapter = IdentityAdapter.on(backbone, cfg.adapter)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return cfg, backbone, AdapterFolder(tmp_path_factory.mktemp("adapter")).write(adapter.weights())


def test_the_kohya_export_loads_with_diffusers_and_gives_the_adapters_output(adapted, tmp_path):
    from diffusers import AnimateDiffPipeline

    cfg, backbone, weights = adapted
    path = tmp_path / "identity.safetensors"
    path.write_bytes(kohya_lora_bytes(weights.read_bytes(), cfg.adapter.active_fraction))
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    assert any("_attn2_" in k for k in keys) and not any("motion_modules" in k for k in keys)
    assert alphas == {2.0} and metadata["ss_network_dim"] == "4"
    assert json.loads(metadata["pv_ray.active_fraction"]) == cfg.adapter.active_fraction

    timestep = 10  # inside the isolation window, where the adapter acts
    ours = unet_output(backbone, timestep)
    other = load_backbone(cfg.model)
    base = unet_output(other, timestep)
    pipe = AnimateDiffPipeline(
        vae=other.vae, text_encoder=other.text_encoder, tokenizer=other.tokenizer, unet=other.unet,
        motion_adapter=None, scheduler=other.scheduler,
    )  # fmt: skip
    pipe.load_lora_weights(str(path), adapter_name="exported")  # diffusers reads kohya keys here
    theirs = unet_output(other, timestep)
    assert not torch.allclose(ours, base, atol=1e-3), "the adapter must change the output at all"
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def test_pv_ray_export_writes_the_kohya_file_of_a_stored_adapter(tiny_models, tmp_path):
    from pv_ray.backbones import load_backbone
    from pv_ray.presets.tiny import write_random_adapters

    store = tmp_path / "store"
    cfg = load_config(TINY)
    write_random_adapters(load_backbone(cfg.model), cfg, str(store), ["alice"], scale=0.3)
    out = tmp_path / "exports" / "alice.safetensors"
    r = subprocess.run(
        [PV_RAY, "export", "--store", str(store), "--identity", "alice", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "last 25% of denoising" in r.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora" and len(list(f.keys())) > 0
    for args, message in (
        (["--identity", "nobody", "--out", str(out)], "no complete adapter 'nobody'"),
        (["--identity", "../x", "--out", str(out)], "invalid identity id"),
        (["--identity", "alice", "--out", str(tmp_path / "a.ckpt")], "must end in .safetensors"),
        (["--identity", "alice", "--out", str(out), "--format", "ckpt"], "only kohya"),
    ):
        r = subprocess.run([PV_RAY, "export", "--store", str(store), *args], capture_output=True, text=True)
        assert r.returncode == 2 and message in " ".join(r.stderr.split()), r.stderr

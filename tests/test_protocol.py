"""The backbone protocol is complete: a second family, written here against `VideoBackbone` alone,
tunes, saves, loads and generates through the same personalizer, adapter folder and pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin

from pv_ray.config import load_config
from pv_ray.method.personalizer import Personalizer
from pv_ray.model.pipeline import VideoPipeline
from pv_ray.model.protocol import SampleSpec, VideoBackbone
from pv_ray.prompts import IdentityMeta
from pv_ray.storage.adapter_folder import AdapterFolder, LoraWeights

ROOT = Path(__file__).resolve().parents[1]
SCALE = 8  # pixels per latent cell


class ToyBlock(torch.nn.Module):
    def __init__(self, width: int, text_dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))
        self.to_out = torch.nn.Linear(width, width)
        self.text = torch.nn.Linear(text_dim, width)

    def forward(self, x, text):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return x + self.to_out(F.scaled_dot_product_attention(q, k, v)) + self.text(text.mean(1, keepdim=True))


class ToyTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A DiT in miniature: latent cells are tokens, self-attention blocks, text added per block."""

    @register_to_config
    def __init__(self, channels: int = 3, width: int = 16, text_dim: int = 8):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(channels, width), torch.nn.Linear(width, channels)
        self.blocks = torch.nn.ModuleList(ToyBlock(width, text_dim) for _ in range(2))

    def forward(self, latents, timestep, encoder_hidden_states):
        b, c, f, h, w = latents.shape
        x = self.proj_in(latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
        x = x + torch.sin(torch.as_tensor(timestep, dtype=x.dtype) / 100)
        for block in self.blocks:
            x = block(x, encoder_hidden_states)
        return self.proj_out(x).reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


class ToyBackbone:
    """A `VideoBackbone` of its own family: a hashed-token text encoder, a `ToyTransformer`, and
    a decoder that draws the latents over a fixed portrait (so the tiny face pack finds a face)."""

    family, lora_component = "toy", "transformer"
    device, dtype = torch.device("cpu"), torch.float32
    record = {"family": "toy", "fingerprint": "0" * 64, "name": "toy"}

    def __init__(self, faces: Path, portrait: np.ndarray):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.denoiser = ToyTransformer().requires_grad_(False).eval()
            self.words = torch.nn.Embedding(1000, 8).requires_grad_(False)
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        self.faces_folder = faces
        self.portrait = torch.from_numpy(portrait).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)

    num_train_timesteps, max_frames, adds_step_noise = 1000, None, False

    def adapter_targets(self, cfg) -> str:
        return r"blocks\.\d+\.(to_q|to_k|to_v|to_out)"

    def clip_problem(self, spec: SampleSpec) -> str | None:
        return None if spec.num_frames <= 4 else "the toy makes up to 4 frames"

    def make_scheduler(self, spec: SampleSpec):
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(spec.num_inference_steps)
        return scheduler

    def encode_prompts(self, prompts):
        return self.words(
            torch.tensor([[sum(w.encode()) % 1000 for w in (p.split() + ["."] * 4)[:4]] for p in prompts])
        )

    def initial_latents(self, spec, generator, batch=1):
        shape = (batch, 3, spec.num_frames, spec.height // SCALE, spec.width // SCALE)
        return torch.randn(shape, generator=generator)

    def predict(self, latents, timestep, embeds, **conditioning):
        return self.denoiser(latents, timestep, encoder_hidden_states=embeds)

    def decode_frames(self, latents, frame_indices=None):
        if frame_indices is not None:
            latents = torch.stack([latents[k, :, idx] for k, idx in enumerate(frame_indices)])
        b, c, f, h, w = latents.shape
        up = F.interpolate(latents.transpose(1, 2).reshape(b * f, c, h, w), scale_factor=SCALE, mode="bilinear")
        frames = torch.tanh(torch.atanh(self.portrait.clamp(-0.95, 0.95)) + 0.3 * up)
        return frames.reshape(b, f, c, h * SCALE, w * SCALE)

    def checkpoint_blocks(self, which):
        return [] if which is False else list(self.denoiser.blocks)


def frozen(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights (peft's wrapped `base_layer`s under their original names)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in module.state_dict().items() if "lora_" not in k}


def test_a_second_family_tunes_saves_loads_and_generates_through_the_same_code(tmp_path, tiny_models):
    import skimage
    from PIL import Image

    photo = (Path(skimage.data.__file__).parent / "astronaut.png").read_bytes()
    portrait = np.asarray(Image.open(Path(skimage.data.__file__).parent / "astronaut.png").resize((128, 128)))
    backbone = ToyBackbone(tiny_models / "faces", portrait[..., :3])
    assert isinstance(backbone, VideoBackbone)
    base_weights = frozen(backbone.denoiser)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=3", "train.face_det_thresh=0.05"])

    personalizer = Personalizer(cfg, backbone=backbone)
    reference = personalizer.reference({"astronaut.png": photo})
    result = personalizer.personalize("astro", reference, tmp_path / "astro", meta=IdentityMeta(class_word="woman"))
    assert [m.step for m in result.history] == [1, 2, 3]
    assert all(math.isfinite(m.loss) for m in result.history)
    assert result.info["backbone"]["family"] == "toy"

    # Saved in the family's diffusers naming, on the toy's targets only; the base untouched.
    weights = AdapterFolder(result.adapter_dir).weights()
    assert weights.component == "transformer" and weights.rank == cfg.adapter.rank
    modules = {k.removeprefix("transformer.").rpartition(".lora.")[0] for k in weights.tensors}
    assert modules == {f"blocks.{i}.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out")}
    assert sum(float(t.abs().sum()) for k, t in weights.tensors.items() if ".lora.up." in k) > 0, "tuning changed B"
    after = frozen(backbone.denoiser)
    assert after.keys() == base_weights.keys() and all(torch.equal(after[k], v) for k, v in base_weights.items())

    # Loaded into a fresh pipeline on a fresh backbone: the same frames as the tuning process's.
    spec, prompt = SampleSpec(2, 128, 128, 4, 1.0), "a woman walking"  # the portrait's size
    tuned_frames = personalizer.pipeline(prompt, spec, seed=1)
    fresh = VideoPipeline.for_adapters(ToyBackbone(tiny_models / "faces", portrait[..., :3]), cfg.adapter)
    with fresh.base_model():
        base_frames = fresh(prompt, spec, seed=1)
    fresh.use_identity(LoraWeights.read(result.adapter_dir), cfg.adapter.active_fraction)
    loaded_frames = fresh(prompt, spec, seed=1)
    assert torch.isfinite(loaded_frames).all()
    assert torch.allclose(loaded_frames, tuned_frames, atol=1e-6)
    assert not torch.allclose(loaded_frames, base_frames, atol=1e-4), "the adapter changes the video"


@pytest.mark.parametrize("member", ["predict", "decode_frames", "adapter_targets"])
def test_an_incomplete_backbone_is_not_a_video_backbone(member, tiny_models):
    backbone = ToyBackbone(tiny_models / "faces", np.zeros((128, 128, 3), np.uint8))
    assert isinstance(backbone, VideoBackbone)
    incomplete = object.__new__(
        type("Incomplete", (), {k: v for k, v in vars(ToyBackbone).items() if k != member and not k.startswith("__")})
    )
    incomplete.__dict__.update(vars(backbone))
    assert not isinstance(incomplete, VideoBackbone)

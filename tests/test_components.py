"""The rest of the method: style LoRAs and ControlNet with no retuning, real semantic scorers,
and an independent identity judge."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pv_ray.backbones import load_backbone
from pv_ray.config import load_config
from pv_ray.evaluation.judge import SAME_PERSON_BELOW, IndependentJudge, judge_available
from pv_ray.model.adapter import IdentityAdapter
from pv_ray.model.animatediff.controlnet import Control, load_controlnet
from pv_ray.model.animatediff.styles import StyleError, StyleLoras, parse_style_option
from pv_ray.model.sampling import SampleSpec, generate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def backbone(tiny_models):
    return load_backbone(load_config(TINY).model)


@pytest.fixture(scope="module")
def styled(backbone, style_loras):
    """The tiny backbone with a random identity adapter (window 0.25) and three styles resident."""
    adapter = IdentityAdapter.on(backbone, load_config(TINY).adapter)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    styles = StyleLoras(backbone, adapter)
    for name, path in style_loras.items():
        styles.load(name, path)
    yield adapter, styles
    styles.use({})


def unet_output(backbone, adapter, styles, timestep: int, selection: dict, identity: bool = True) -> torch.Tensor:
    latents = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = backbone.encode_prompts(["a person walking"]).repeat_interleave(2, 0)
    styles.use(selection)
    with torch.no_grad():
        if identity:
            return backbone.unet(latents, timestep, encoder_hidden_states=embeds).sample
        with adapter.disabled():
            return backbone.unet(latents, timestep, encoder_hidden_states=embeds).sample


def test_a_style_lora_composes_with_the_identity_adapter_and_its_window(backbone, styled):
    adapter, styles = styled
    out = lambda t, selection, identity=True: unet_output(backbone, adapter, styles, t, selection, identity)  # noqa: E731
    # Outside the window (t = 900 >= 250) the identity adapter is off: identity + style is style alone.
    assert torch.equal(out(900, {"diffusers": 1.0}), out(900, {"diffusers": 1.0}, identity=False))
    assert not torch.allclose(out(900, {"diffusers": 1.0}, identity=False), out(900, {}, identity=False))
    # Inside it both contribute, on the same attention layers (the style targets attn1 too).
    both, style_only, identity_only = out(100, {"diffusers": 1.0}), out(100, {"diffusers": 1.0}, False), out(100, {})
    assert (both - style_only).abs().max() > 1e-3 and (both - identity_only).abs().max() > 1e-3
    shared = {
        n
        for n, m in backbone.unet.named_modules()
        if hasattr(m, "lora_A") and {"identity", "style_diffusers"} <= set(m.lora_A)
    }
    assert any(".attn1.to_q" in n for n in shared)
    # Each style has its own scale; the kohya copy of the same weights acts the same.
    assert not torch.allclose(out(900, {"diffusers": 0.5}, False), out(900, {"diffusers": 1.0}, False))
    assert torch.allclose(out(900, {"kohya": 1.0}, False), out(900, {"diffusers": 1.0}, False), atol=1e-6)
    assert not torch.allclose(out(900, {"warm": 1.0}, False), out(900, {"diffusers": 1.0}, False))


def test_bad_style_loras_are_refused_with_the_reason(tmp_path, styled):
    _, styles = styled
    with pytest.raises(StyleError, match="need a .safetensors file"):
        styles.load("pickled", tmp_path / "style.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(StyleError, match="not a readable LoRA file"):
        styles.load("broken", tmp_path / "broken.safetensors")
    with pytest.raises(StyleError, match="unknown style"):
        styles.use({"nope": 1.0})
    assert parse_style_option("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert parse_style_option("c:/x/b.safetensors") == (Path("c:/x/b.safetensors"), 1.0)


def blob_clip(frames: int, size: int = 128) -> torch.Tensor:
    """A bright square moving left to right, one position per frame, in [0, 1]."""
    clip = torch.zeros(frames, 3, size, size)
    for f in range(frames):
        x = 8 + 12 * f
        clip[f, :, 48:80, x : x + 32] = 1.0
    return clip


def test_controlnet_frames_follow_the_control(backbone, tiny_models):
    """A zero-output ControlNet leaves the frames as they are; the tiny preset's ControlNet
    changes them where its control is: the change's centre moves with a moving blob."""
    net = load_controlnet(tiny_models / "controlnet", backbone.device, backbone.dtype)
    spec, frames = SampleSpec(8, 128, 128, 4, 1.0), 8
    plain = generate(backbone, "a person", spec, seed=0)
    blob = blob_clip(frames)
    blank = generate(backbone, "a person", spec, seed=0, control=Control(net, torch.zeros_like(blob)))
    following = generate(backbone, "a person", spec, seed=0, control=Control(net, blob))
    assert (blank - plain).abs().mean() > 0.01, "a non-zero ControlNet changes the frames"
    change = (following - blank).abs().mean(1)  # (F, H, W): what the blob itself changes
    columns = torch.arange(128).float()
    centres = [float((change[f].mean(0) * columns).sum() / change[f].mean(0).sum()) for f in range(frames)]
    inside = [float(change[f][blob[f, 0] > 0].mean() / change[f][blob[f, 0] == 0].mean()) for f in range(frames)]
    print(
        f"\nchange centre per frame {[round(c) for c in centres]}, blob centre {[24 + 12 * f for f in range(frames)]}"
    )
    assert np.corrcoef(centres, [24 + 12 * f for f in range(frames)])[0, 1] > 0.9
    assert min(inside) > 1.5, inside
    zero = load_controlnet(tiny_models / "controlnet", backbone.device, backbone.dtype)
    with torch.no_grad():
        for layer in (*zero.controlnet_down_blocks, zero.controlnet_mid_block):
            layer.weight.zero_()
            layer.bias.zero_()
    assert torch.equal(generate(backbone, "a person", spec, seed=0, control=Control(zero, blob)), plain)


def write_clip(path: Path, frames: int, size: int) -> Path:
    """The moving blob as a GIF, or as a folder of PNG frames when `path` has no suffix."""
    from pv_ray.storage.video import write_video

    clip = (blob_clip(frames, size).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    if path.suffix:
        write_video(clip, path, fps=8)
    else:
        path.mkdir()
        for i, frame in enumerate(clip):
            Image.fromarray(frame).save(path / f"{i:03d}.png")
    return path


def test_the_cli_generates_with_a_style_and_a_controlnet_and_refuses_bad_clips(tmp_path, tiny_models, style_loras):
    from test_cli_generate import pv_ray

    from pv_ray.storage.video import read_video

    common = ["generate", "--config", str(TINY), "--prompt", "a person", "--frames", "8", "--steps", "2"]
    control = [
        "--controlnet",
        str(tiny_models / "controlnet"),
        "--control",
        str(write_clip(tmp_path / "c.gif", 8, 128)),
    ]
    plain = pv_ray(*common, "--out", str(tmp_path / "plain.gif"))
    styled = pv_ray(
        *common, "--out", str(tmp_path / "styled.gif"), "--style-lora", f"{style_loras['kohya']}:0.8", *control
    )
    assert plain.returncode == 0 and styled.returncode == 0, styled.stderr
    assert not np.array_equal(read_video(tmp_path / "plain.gif"), read_video(tmp_path / "styled.gif"))
    for clip, message in (
        (write_clip(tmp_path / "short.gif", 3, 128), "3 frames, the video has 8 (--frames)"),
        (write_clip(tmp_path / "small-frames", 8, 64), "frames are 64x64, the video is 128x128"),
    ):
        r = pv_ray(
            *common,
            "--out",
            str(tmp_path / "x.gif"),
            "--controlnet",
            str(tiny_models / "controlnet"),
            "--control",
            str(clip),
        )
        assert r.returncode == 2 and message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr, r.stderr


def open_clip_checkpoint(path: Path, vocab: int) -> Path:
    """A checkpoint in HPSv2's layout (open_clip ViT: `visual.*`, `transformer.*`, in_proj
    weights), small and with seeded random weights, written as torch.save writes tensors."""
    gen = torch.Generator().manual_seed(0)
    width, layers, patch, image, context, projection = 64, 2, 8, 32, 77, 32

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    state = {"token_embedding.weight": r(vocab, width), "positional_embedding": r(context, width),
             "ln_final.weight": torch.ones(width), "ln_final.bias": torch.zeros(width),
             "text_projection": r(width, projection),
             "logit_scale": torch.tensor(4.6052), "visual.conv1.weight": r(width, 3, patch, patch),
             "visual.class_embedding": r(width), "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
             "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
             "visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width),
             "visual.proj": r(width, projection)}  # fmt: skip
    for prefix in ("transformer.resblocks", "visual.transformer.resblocks"):
        for i in range(layers):
            block = f"{prefix}.{i}"
            state |= {f"{block}.ln_1.weight": torch.ones(width), f"{block}.ln_1.bias": torch.zeros(width),
                      f"{block}.ln_2.weight": torch.ones(width), f"{block}.ln_2.bias": torch.zeros(width),
                      f"{block}.attn.in_proj_weight": r(3 * width, width), f"{block}.attn.in_proj_bias": r(3 * width),
                      f"{block}.attn.out_proj.weight": r(width, width), f"{block}.attn.out_proj.bias": r(width),
                      f"{block}.mlp.c_fc.weight": r(4 * width, width), f"{block}.mlp.c_fc.bias": r(4 * width),
                      f"{block}.mlp.c_proj.weight": r(width, 4 * width),
                      f"{block}.mlp.c_proj.bias": r(width)}  # fmt: skip
    torch.save({"state_dict": state}, path)
    return path


def test_the_hpsv2_path_reads_an_open_clip_checkpoint_without_unpickling(tmp_path, tiny_models):
    from transformers import CLIPTokenizer

    from pv_ray.method.scorers import ScorerError, load_hpsv2

    vocab = len(CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"))
    checkpoint = open_clip_checkpoint(tmp_path / "HPS_v2_compressed.pt", vocab)
    scorer = load_hpsv2(checkpoint, tiny_models / "tokenizer", torch.device("cpu"))
    assert scorer.model.config.vision_config.image_size == 32 and scorer.model.config.text_config.num_hidden_layers == 2
    frames = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    scores = scorer(frames, "a woman walking")
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0, "differentiable with respect to the frames"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}, "code": print}, evil)  # a pickled function
    with pytest.raises(ScorerError, match="not a weights-only torch file"):
        load_hpsv2(evil, tiny_models / "tokenizer", torch.device("cpu"))


@pytest.mark.parametrize("scorer", ["clip", "hpsv2"])
def test_semantic_consistency_trains_with_a_real_scorer(tmp_path, tiny_models, tiny_clip, scorer):
    from test_tuner import skimage_photo
    from transformers import CLIPTokenizer

    from pv_ray.method.personalizer import Personalizer

    vocab = len(CLIPTokenizer.from_pretrained(tiny_models / "tokenizer"))
    model = tiny_clip if scorer == "clip" else open_clip_checkpoint(tmp_path / "hps.pt", vocab)
    overrides = ["train.steps=2", "train.lambda_scr=1.0", f"train.scr_scorer={scorer}", f"train.scr_model={model}",
                 f"train.scr_tokenizer={tiny_models / 'tokenizer'}"]  # fmt: skip
    personalizer = Personalizer(load_config(TINY, overrides))
    reference = personalizer.analyzer.reference({"astronaut.png": skimage_photo("astronaut.png")})
    result = personalizer.personalize("astronaut", reference, tmp_path / "adapter", evaluate=False)
    assert all(np.isfinite(m.loss_scr) for m in result.history)
    assert any(m.loss_scr > 0 for m in result.history), "the KL between adapted and base scores is logged"
    assert all(m.loss == pytest.approx(m.loss_id + m.loss_scr, rel=1e-4, abs=1e-6) for m in result.history)


def demo_portrait(identity_id: str) -> Image.Image:
    from pv_ray.presets.demo import demo_photos

    return demo_photos()[identity_id][0]


@pytest.mark.skipif(
    not judge_available(), reason="the independent judge is an optional extra: pip install 'pv-ray[judge]'"
)
def test_the_independent_judge_rates_the_same_person_closer_than_another():
    """dlib's recogniser on real photos that ship in installed packages: the astronaut and her
    mirror image or a smaller copy are one person; the astronaut and Tom Hanks are not."""
    judge = IndependentJudge()
    astronaut, hanks = demo_portrait("astronaut"), demo_portrait("tom-hanks")
    reference = judge.describe(np.asarray(astronaut))
    same = [
        judge.describe(np.asarray(ImageOps.mirror(astronaut))),
        judge.describe(np.asarray(astronaut.resize((160, 160)))),
    ]
    other = judge.describe(np.asarray(hanks))
    distances_same = [float(np.linalg.norm(d - reference)) for d in same]
    distance_other = float(np.linalg.norm(other - reference))
    print(f"\nindependent judge: same person {distances_same}, another person {distance_other:.3f}")
    assert max(distances_same) < SAME_PERSON_BELOW < distance_other
    photo = io.BytesIO()
    astronaut.save(photo, format="PNG")
    assert np.linalg.norm(judge.reference_of({"a.png": photo.getvalue(), "bad.png": b"x"}, 10**8) - reference) < 1e-5
    assert judge.describe(np.full((128, 128, 3), 128, np.uint8)) is None

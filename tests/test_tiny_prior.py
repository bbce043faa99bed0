"""The tiny-prior preset: the shipped trained tiny backbone, and the script that trains one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pv_ray.backbones import load_backbone
from pv_ray.config import load_config
from pv_ray.evaluation.metrics import dynamic_degree, temporal_consistency
from pv_ray.model.animatediff.backbone import AnimateDiffBackbone as Backbone
from pv_ray.model.sampling import SampleSpec, generate
from pv_ray.presets.tiny import TINY_PRIOR_PARTS, ensure_tiny_prior_models
from pv_ray.storage.video import frames_to_uint8

ROOT = Path(__file__).resolve().parents[1]
TINY_PRIOR = ROOT / "configs" / "tiny-prior.yaml"
SPEC = SampleSpec(num_frames=8, height=128, width=128, num_inference_steps=4, guidance_scale=1.0)


def clip_stats(backbone: Backbone, seeds) -> tuple[float, float]:
    """Mean (temporal consistency, dynamic degree) of clips sampled with `seeds`."""
    clips = [frames_to_uint8(generate(backbone, "a person", SPEC, seed=seed)) for seed in seeds]
    return float(np.mean([temporal_consistency(c) for c in clips])), float(np.mean([dynamic_degree(c) for c in clips]))


def test_motion_is_carried_by_the_motion_modules(tiny_prior_models):
    """The trained backbone makes coherent moving clips, and its motion modules are what makes
    them coherent: with the modules' output zeroed (each becomes the identity), every frame is
    sampled on its own and consecutive frames no longer match."""
    backbone = load_backbone(load_config(TINY_PRIOR).model)
    assert backbone.paths.base == tiny_prior_models
    consistency, motion = clip_stats(backbone, range(4))
    outputs = [m.proj_out for name, m in backbone.unet.named_modules() if re.fullmatch(r".*motion_modules\.\d+", name)]
    assert len(outputs) == 7  # 2 down blocks, the mid block, 2 up blocks x 2 layers
    with torch.no_grad():
        for linear in outputs:
            linear.weight.zero_()
            linear.bias.zero_()
    consistency_without, motion_without = clip_stats(backbone, range(4))
    print(
        f"\ntiny-prior: temporal consistency {consistency:.3f}, dynamic degree {motion:.4f}; "
        f"motion modules zeroed: {consistency_without:.3f}, {motion_without:.4f}"
    )
    assert consistency > 0.85 and motion > 0.005, "the trained backbone makes coherent clips that move"
    assert consistency_without < 0.5, "without its motion modules the frames are unrelated"


def test_the_preset_is_the_seed_0_tiny_preset_with_the_shipped_parts(tiny_prior_models, tiny_models):
    for part in TINY_PRIOR_PARTS:
        shipped = ROOT / "pv_ray" / "presets" / "tiny_prior" / part / "diffusion_pytorch_model.safetensors"
        assert (tiny_prior_models / part / shipped.name).read_bytes() == shipped.read_bytes()
    assert (tiny_prior_models / "faces" / "det_tiny.onnx").read_bytes() == (
        tiny_models / "faces" / "det_tiny.onnx"
    ).read_bytes()
    with pytest.raises(ValueError, match="tiny-prior was trained from the seed-0 tiny preset"):
        load_config(TINY_PRIOR, ["model.seed=1"])


def test_training_script_makes_moving_clips_and_loadable_parts(model_cache, tmp_path):
    """A few CPU steps of jobs/train_tiny_prior.py: its synthetic clips move, and what it
    writes lays over the tiny preset and loads through `Backbone.from_pretrained`."""
    sys.path.insert(0, str(ROOT / "jobs"))
    from train_tiny_prior import source_images, synthetic_clips

    faces, backgrounds = source_images(torch.device("cpu"))
    clips = synthetic_clips(faces, backgrounds, 3, 8, torch.Generator().manual_seed(0))
    assert clips.shape == (3, 8, 3, 128, 128) and clips.min() >= -1 and clips.max() <= 1
    assert min(dynamic_degree(frames_to_uint8(c)) for c in clips) > 0.005, "every training clip moves"

    out = tmp_path / "trained"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train_tiny_prior.py"),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--vae-batch",
            "4",
            "--unet-batch",
            "1",
            "--frames",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    log = json.loads((out / "train_log.json").read_text())
    assert (log["vae_steps"], log["unet_steps"]) == (2, 2)
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(1 / log["latent_std"])

    world = ensure_tiny_prior_models(trained=out)
    assert world != ensure_tiny_prior_models(), "other weights, another folder"
    backbone = load_backbone(load_config(TINY_PRIOR, ["model.preset=null", f"model.base={world}"]).model)
    frames = generate(backbone, "a person", SampleSpec(2, 64, 64, 2, 1.0), seed=0)
    assert frames.shape == (2, 3, 64, 64) and torch.isfinite(frames).all()


RANK_BUILDS = """
import sys
import torch.distributed as dist
from pv_ray.presets.tiny import build_tiny_models

rank, address, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
if rank == 1:
    build_tiny_models(out)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_worker_of_rank_1_builds_the_whole_preset(tmp_path):
    """A Ray Train worker is a torch.distributed rank, and transformers' save_pretrained writes
    nothing on a rank other than 0: a cold cache built by rank 1 once held an empty text_encoder/."""
    from cli_service import free_port

    address, out = f"tcp://127.0.0.1:{free_port()}", tmp_path / "tiny"
    ranks = [
        subprocess.Popen([sys.executable, "-c", RANK_BUILDS, str(rank), address, str(out)], stderr=subprocess.PIPE)
        for rank in (0, 1)
    ]
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr.read().decode()[-2000:]
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    assert load_backbone(load_config(TINY_PRIOR, [f"model.base={out}"]).model).text_encoder is not None

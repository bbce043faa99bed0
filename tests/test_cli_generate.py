"""`pv-ray generate` end to end, and its one-line errors, as a user runs it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pv_ray.storage.adapter_folder import AdapterFolder
from pv_ray.storage.video import read_video

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def pv_ray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pv_ray", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tiny_models) -> Path:
    """A non-zero adapter saved by pv-ray for the tiny backbone (rank 8, as configs/tiny.yaml)."""
    import torch

    from pv_ray.backbones import load_backbone
    from pv_ray.config import load_config
    from pv_ray.model.adapter import IdentityAdapter

    cfg = load_config(TINY)
    backbone = load_backbone(cfg.model)
    adapter = IdentityAdapter.on(backbone, cfg.adapter.model_copy(update={"active_fraction": 1.0}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("adapter")
    AdapterFolder(out).write(adapter.weights())
    return out


def test_generate_mp4_and_gif_deterministic_and_adapter_changes_frames(tmp_path, tiny_models, saved_adapter):
    common = [
        "generate",
        "--config",
        TINY,
        "--prompt",
        "a person smiling",
        "--frames",
        "6",
        "--steps",
        "4",
        "--seed",
        "0",
    ]
    r = pv_ray(*common, "--out", str(tmp_path / "a.gif"))
    assert r.returncode == 0, r.stderr
    assert "wrote 6 frames" in r.stderr
    first = read_video(tmp_path / "a.gif")
    assert first.shape == (6, 128, 128, 3)

    assert pv_ray(*common, "--out", str(tmp_path / "b.gif")).returncode == 0
    assert np.array_equal(first, read_video(tmp_path / "b.gif")), "same seed must give identical frames"

    r = pv_ray(
        *common,
        "--out",
        str(tmp_path / "c.mp4"),
        "--set",
        "adapter.active_fraction=1.0",
        "--adapter",
        str(saved_adapter),
    )
    assert r.returncode == 0, r.stderr
    adapted = read_video(tmp_path / "c.mp4")
    assert adapted.shape == (6, 128, 128, 3)
    assert np.abs(adapted.astype(int) - first.astype(int)).mean() > 5, "a non-zero adapter must change the frames"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "MISSING_MODEL"], "model.base folder not found"),
        (["--set", "video.stpes=3"], "unknown key 'video.stpes'"),
        (["--out", "{tmp}/clip.avi"], "unsupported video format 'avi'"),
        (["--frames", "0"], "frames must be in 1..32, got 0"),
        (["--frames", "99"], "frames must be in 1..32, got 99"),
        (["--steps", "500"], "steps must be in 1..50, got 500"),
        (["--adapter", "{tmp}/nowhere"], "no adapter file"),
        (["--config", "{tmp}/absent.yaml"], "config file not found"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, model_cache, args, message):
    missing_model = tmp_path / "missing.yaml"
    missing_model.write_text(f"model:\n  base: {tmp_path / 'no-such-model'}\n")
    args = [a.replace("{tmp}", str(tmp_path)).replace("MISSING_MODEL", str(missing_model)) for a in args]
    base = {"--config": TINY, "--prompt": "a person", "--out": str(tmp_path / "x.mp4")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    extra = [x for pair in base.items() for x in pair]
    r = pv_ray("generate", *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_init_tiny_writes_a_diffusers_folder(tmp_path):
    r = pv_ray("models", "init-tiny", "--out", str(tmp_path / "tiny"))
    assert r.returncode == 0, r.stderr
    for part in (
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "motion_adapter",
        "faces",
    ):
        assert (tmp_path / "tiny" / part).exists(), part
    r = pv_ray("models", "init-tiny", "--out", str(tmp_path / "tiny"))
    assert r.returncode == 2 and "not empty" in r.stderr

"""The full-size benchmark's GPU run, on a CPU at a tiny size.

A GPU is lent to some sessions only, for minutes: the run it gets must not break on a path that
could have been tried here. This runs the code a GPU run runs (the full-size architecture with
random weights, pv-ray's tuning loop with the speed switches, the FLOP counts, the JSON), only
smaller, and checks every figure the issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "jobs" / "benchmarks"


def test_the_gpu_run_s_code_path_writes_every_figure(tmp_path):
    variants = ["no_ckpt", "ckpt_outer+channels_last+cfg_free"]
    command = [
        sys.executable, str(BENCHMARKS / "bench_fullsize.py"), "--out", str(tmp_path), "--device", "cpu",
        "--height", "32", "--width", "32", "--frames", "2", "--steps-timed", "1", "--warmup", "0",
        "--variants", ",".join(variants), "--batching-steps", "1", "--clip-steps", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_fullsize.json").read_text())

    # FLOPs at the paper's size: the parts add up, and each switch moves them the way it should.
    assert result["flops_per_step"] == sum(result["flops"]["parts"].values()) > 1e14
    assert result["ideal_step_s_at_peak"] == pytest.approx(result["flops_per_step"] / 790e12, abs=1e-4)
    assert (
        result["flops_cfg_free"]
        < result["flops_per_step"]
        < result["flops_gradient_checkpointing_outer"]
        < result["flops_gradient_checkpointing"]
    )
    # CFG doubles the UNet batch: CFG-free saves about half of the rollout's work.
    assert 0.45 < result["flops_cfg_free"] / result["flops_per_step"] < 0.6

    timed = {name: result[name] for name in variants}
    for name, timing in timed.items():
        assert timing["steps_timed"] == 1 and timing["step_s"] > 0 and timing["evaluation_clip_s"] > 0, name
        assert timing["minutes_per_identity_800_steps"] == pytest.approx(800 * timing["step_s"] / 60, rel=1e-2)
        assert timing["tflops_per_s"] == pytest.approx(timing["flops_per_step"] / timing["step_s"] / 1e12, abs=0.01)
    assert timed[variants[1]]["flops_per_step"] < timed["no_ckpt"]["flops_per_step"]  # CFG-free
    assert result["step_s"] == timed["no_ckpt"]["step_s"], "the headline keeps the paper's CFG rollouts"

    batching = result["identities_per_batch"]
    ratio = batching["k4_identity_steps_per_s"] / batching["k1_identity_steps_per_s"]
    assert batching["k4_over_k1"] == pytest.approx(ratio, rel=1e-2)


def test_the_gpu_run_s_wan_code_path_writes_every_figure(tmp_path):
    """bench_wan.py as gpu_fullsize.sh runs it (random weights, the prompt-embeddings path, K=1 and
    K=4) on a CPU: the 1.3B architecture built on the meta device for its FLOPs at 480x832, timed at
    the tiny size (the 1.3B's 512 text tokens through 30 blocks take minutes here, even at 32 px)."""
    command = [
        sys.executable, str(BENCHMARKS / "bench_wan.py"), "--out", str(tmp_path), "--device", "cpu", "--size", "tiny",
        "--height", "32", "--width", "32", "--frames", "5", "--batching-height", "32", "--batching-width", "32",
        "--batching-frames", "5", "--steps-timed", "1", "--warmup", "0", "--flops-at", "1.3b:33",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_wan.json").read_text())
    (flops,) = result["flops"]
    assert flops["flops_per_step"] == sum(flops["parts"].values()) > 1e15 and flops["latent_frames"] == 9
    # 8 rollout steps with CFG: 7 forwards without gradient, one with (its backward ~2x, recomputed blocks 1x)
    assert flops["parts"]["rollout_no_grad_steps"] == 7 * flops["transformer_forward_cfg"]
    assert 3 < flops["parts"]["grad_step_forward_backward_ckpt"] / flops["transformer_forward_cfg"] < 5
    assert flops["ideal_minutes_per_identity_800_steps_H100"] == pytest.approx(
        800 * flops["flops_per_step"] / 989e12 / 60, abs=0.01
    )
    timings = result["timing"]
    assert [t["identities_per_batch"] for t in timings] == [1, 1, 4] and all(t["steps_timed"] == 1 for t in timings)
    for t in timings:
        assert t["step_s"] > 0 and t["no_face_rate"] < 1, "faces were seen: the identity loss ran"
        assert t["minutes_per_identity_800_steps"] == pytest.approx(800 * t["identity_step_s"] / 60, rel=1e-2)
    ratio = timings[1]["identity_step_s"] / timings[2]["identity_step_s"]
    assert result["k4_over_k1_identity_steps_per_s"] == pytest.approx(ratio, rel=1e-2)


def test_the_gpu_script_says_how_it_is_called():
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_fullsize.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "usage: gpu_fullsize.sh download WHEELS | run WHEELS OUT" in done.stderr

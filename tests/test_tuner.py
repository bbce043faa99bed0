"""Tuning one identity on the tiny presets: what changes, what the method buys, what it keeps."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pv_ray.config import load_config
from pv_ray.faces.analysis import IdentityRejected
from pv_ray.method.personalizer import Personalizer
from pv_ray.prompts import IdentityMeta

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_PRIOR = ROOT / "configs" / "tiny-prior.yaml"


def skimage_photo(name: str) -> bytes:
    import skimage

    return (Path(skimage.data.__file__).parent / name).read_bytes()


def insightface_photo(name: str) -> bytes:
    import insightface

    return (Path(insightface.__file__).parent / "data" / "images" / name).read_bytes()


def digest(*modules: torch.nn.Module) -> str:
    """Hash of every non-LoRA tensor of the modules: the frozen backbone."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if "lora_" not in name:
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_models):
    """The astronaut tuned for 100 steps; evaluation on 3 held-out prompts before and after, and
    the same clips scored against another person (Tom Hanks) as a control."""
    from pv_ray.evaluation.clips import evaluate_prompts, evaluation_spec

    cfg = load_config(TINY, ["train.steps=100"])
    personalizer = Personalizer(cfg)
    b = personalizer.backbone
    frozen_before = digest(b.unet, b.vae, b.text_encoder)
    reference = personalizer.reference({"astronaut.png": skimage_photo("astronaut.png")})
    out = tmp_path_factory.mktemp("astronaut")
    result = personalizer.personalize("astronaut", reference, out, meta=IdentityMeta(class_word="woman"))
    other = personalizer.reference({"hanks.png": insightface_photo("Tom_Hanks_54745.png")})
    spec, prompts = evaluation_spec(cfg), result.info["eval_prompts"]
    # Scored as the personalizer scores (the judge too, when installed), so the cached clips serve.
    judge = {"judge": personalizer.judge, "judge_reference": other.independent}
    with personalizer.adapter.disabled():
        other_before = evaluate_prompts(
            personalizer.pipeline,
            personalizer.analyzer,
            other.embedding,
            prompts,
            spec,
            seed=cfg.eval.seed,
            cache=personalizer.base_clips,
            **judge,
        )
    other_after = evaluate_prompts(
        personalizer.pipeline, personalizer.analyzer, other.embedding, prompts, spec, seed=cfg.eval.seed, **judge
    )
    result.control = {"before": other_before["face_sim"], "after": other_after["face_sim"]}
    return personalizer, result, frozen_before


def test_tuning_changes_only_lora_parameters(tuned):
    personalizer, result, frozen_before = tuned
    b = personalizer.backbone
    assert digest(b.unet, b.vae, b.text_encoder) == frozen_before
    lora_norm = sum(float(p.detach().abs().sum()) for p in personalizer.adapter.parameters())
    assert lora_norm > 0 and len(result.history) == 100


def test_tuning_raises_face_similarity_on_unseen_prompts(tuned):
    """On held-out prompts the adapter raises similarity to the tuned person (measured: 0.211 ->
    0.244, +16%; asserted with a 3x margin). The same clips scored against another person rise
    too (0.199 -> 0.247): the tiny pack's random recogniser rates every face-like frame alike, so
    identity specificity cannot be shown on it (README, "Notes on the tiny preset")."""
    _, result, _ = tuned
    before, after = result.metrics_before["face_sim"], result.metrics_after["face_sim"]
    control = result.control
    print(
        f"\nface_sim on held-out prompts: astronaut {before:.4f} -> {after:.4f}; "
        f"another person {control['before']:.4f} -> {control['after']:.4f}"
    )
    assert after > 1.05 * before, (before, after)
    held_out = set(json.loads((result.adapter_dir / "adapter.json").read_text())["eval_prompts"])
    assert held_out and not any(m.prompt in held_out for m in result.history), (
        "evaluation prompts were never trained on"
    )


def test_adapter_json_records_the_run(tuned):
    _, result, _ = tuned
    info = json.loads((result.adapter_dir / "adapter.json").read_text())
    weights = result.adapter_dir / "pytorch_lora_weights.safetensors"
    assert info["identity_id"] == "astronaut" and info["class_word"] == "woman"
    assert info["sha256"]["pytorch_lora_weights.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["photos"] == [
        {
            "name": "astronaut.png",
            "ok": True,
            "reason": None,
            "det_score": pytest.approx(info["photos"][0]["det_score"]),
        }
    ]
    from pv_ray.evaluation.judge import judge_available

    judged = {"face_dist_independent"} if judge_available() else set()
    assert (
        set(info["metrics_before"]) == {"face_sim", "no_face_rate", "dynamic_degree", "temporal_consistency"} | judged
    )
    assert (info["independent_reference"] is not None) == judge_available()
    assert info["versions"]["diffusers"] and info["config"]["train"]["steps"] == 100
    assert all("woman" in p for p in info["eval_prompts"])


def test_base_clips_are_generated_once_and_scored_per_identity(tuned):
    """The untuned model's evaluation clips are the same for every identity: the personalizer
    caches them, and a cached evaluation must equal a fresh one for any reference."""
    from pv_ray.evaluation.clips import evaluate_prompts, evaluation_spec

    personalizer, result, _ = tuned
    cfg = personalizer.cfg
    prompts = result.info["eval_prompts"]
    assert len(personalizer.base_clips) == len(prompts) == cfg.eval.num_prompts
    other = np.random.default_rng(0).standard_normal(512).astype(np.float32)  # another identity
    spec = evaluation_spec(cfg)
    with personalizer.adapter.disabled():
        cached = evaluate_prompts(
            personalizer.pipeline,
            personalizer.analyzer,
            other,
            prompts,
            spec,
            seed=cfg.eval.seed,
            cache=personalizer.base_clips,
        )
        fresh = evaluate_prompts(personalizer.pipeline, personalizer.analyzer, other, prompts, spec, seed=cfg.eval.seed)
    assert cached == pytest.approx(fresh, nan_ok=True)
    assert cached["face_sim"] != pytest.approx(result.metrics_before["face_sim"]), "similarity is per reference"
    assert cached["dynamic_degree"] == pytest.approx(result.metrics_before["dynamic_degree"])
    assert len(personalizer.base_clips) == len(prompts), "no new clip was generated"


def test_ablation_spatial_adapter_keeps_motion_better_than_motion_module_lora(tiny_prior_models, tmp_path):
    """The paper's ablation, under one budget (configs/tiny-prior.yaml: 60 steps, lr 0.001) on
    the backbone whose motion modules carry its motion, over three training seeds: the
    spatial-only adapter and a LoRA that also targets the motion modules both raise identity on
    held-out prompts, and the spatial one moves dynamic_degree less away from the base model's
    (and stays within 25% of it), on average. Single seeds vary (README, "The tiny-prior
    preset", also has the budgets where the ordering does not hold)."""
    photo = {"astronaut.png": skimage_photo("astronaut.png")}
    drift: dict[bool, list[float]] = {False: [], True: []}
    gain: dict[bool, list[float]] = {False: [], True: []}
    for motion in (False, True):
        for seed in (0, 1, 2):
            cfg = load_config(TINY_PRIOR, [f"adapter.motion_modules={motion}", f"train.seed={seed}"])
            personalizer = Personalizer(cfg)
            assert any("motion_modules" in n for n in personalizer.adapter.layers) == motion
            assert any(".attentions." in n for n in personalizer.adapter.layers)
            reference = personalizer.analyzer.reference(photo)
            result = personalizer.personalize("astronaut", reference, tmp_path / f"{motion}-{seed}")
            before, after = result.metrics_before, result.metrics_after
            drift[motion].append(abs(after["dynamic_degree"] - before["dynamic_degree"]) / before["dynamic_degree"])
            gain[motion].append(after["face_sim"] - before["face_sim"])
            print(
                f"\nmotion_modules={motion} seed {seed}: dynamic_degree {before['dynamic_degree']:.4f} -> "
                f"{after['dynamic_degree']:.4f} (drift {drift[motion][-1]:.1%}); temporal consistency "
                f"{before['temporal_consistency']:.3f} -> {after['temporal_consistency']:.3f}; "
                f"face_sim {before['face_sim']:.4f} -> {after['face_sim']:.4f}"
            )
    spatial, with_motion = float(np.mean(drift[False])), float(np.mean(drift[True]))
    print(f"mean drift: spatial {spatial:.1%}, with motion modules {with_motion:.1%}")
    assert min(gain[False] + gain[True]) > 0, "every adapter raises identity on prompts never trained on"
    assert min(np.mean(gain[False]), np.mean(gain[True])) > 0.03, "by a clear margin on average"
    assert spatial < 0.25, "the spatial adapter keeps the base model's motion"
    assert spatial < with_motion, "the motion-module LoRA moves motion further from the base model's"


def pv_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pv_ray", *args], capture_output=True, text=True, timeout=600)


def photo_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def uniform_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_cli_refuses_a_folder_of_unusable_photos(tmp_path, model_cache):
    astronaut = skimage_photo("astronaut.png")
    folder = photo_folder(
        tmp_path / "bad", {"broken.jpg": astronaut[:2000], "notes.jpg": b"just some text", "grey.png": uniform_png()}
    )
    r = pv_ray(
        "tune", "--config", str(TINY), "--images", str(folder), "--identity", "alice", "--out", str(tmp_path / "out")
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for expected in ("broken.jpg: unreadable", "notes.jpg: not an image", "grey.png: no face detected"):
        assert expected in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_tunes_with_one_good_photo_among_bad_ones(tmp_path, model_cache):
    astronaut = skimage_photo("astronaut.png")
    folder = photo_folder(
        tmp_path / "mixed", {"good.png": astronaut, "broken.jpg": astronaut[:2000], "grey.png": uniform_png()}
    )
    (folder / "meta.json").write_text(json.dumps({"class": "woman"}))
    out = tmp_path / "adapter"
    r = pv_ray(
        "tune",
        "--config",
        str(TINY),
        "--images",
        str(folder),
        "--identity",
        "alice",
        "--out",
        str(out),
        "--set",
        "train.steps=3",
        "--set",
        "eval.num_prompts=1",
    )
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "adapter.json").read_text())
    verdicts = {p["name"]: (p["ok"], p["reason"]) for p in info["photos"]}
    assert verdicts["good.png"] == (True, None)
    assert verdicts["grey.png"] == (False, "no face detected")
    assert verdicts["broken.jpg"][0] is False and "unreadable" in verdicts["broken.jpg"][1]
    assert info["class_word"] == "woman" and info["final_step"]["step"] == 3
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert "adapter written to" in r.stderr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_backbones_tune_float32_lora_weights(tmp_path, tiny_models, dtype):
    """A float16/bfloat16 backbone tunes: loss finite at every step, LoRA parameters float32
    while tuning (AdamW on float16 weights underflows to NaN), stored weights finite and changed,
    the frozen base bit-identical; the half-precision backbone still generates finite frames."""
    from safetensors.torch import load_file

    from pv_ray.model.sampling import SampleSpec, generate

    fast = ["train.steps=3", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]
    personalizer = Personalizer(load_config(TINY, [f"model.dtype={dtype}", *fast]))
    b = personalizer.backbone
    assert b.unet.dtype == b.vae.dtype == getattr(torch, dtype)
    frozen = digest(b.unet, b.vae, b.text_encoder)
    lora_dtypes = []
    reference = personalizer.analyzer.reference({"astronaut.png": skimage_photo("astronaut.png")})
    result = personalizer.personalize(
        "astronaut",
        reference,
        tmp_path,
        on_step=lambda m: lora_dtypes.append({p.dtype for p in personalizer.adapter.parameters()}),
    )
    assert [m.step for m in result.history] == [1, 2, 3] and all(np.isfinite(m.loss) for m in result.history)
    assert lora_dtypes == [{torch.float32}] * 3
    stored = load_file(str(result.adapter_dir / "pytorch_lora_weights.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in stored.values())
    assert sum(float(t.abs().sum()) for k, t in stored.items() if ".lora.up." in k) > 0, (
        "B starts at zero: training changed it"
    )
    assert digest(b.unet, b.vae, b.text_encoder) == frozen
    frames = generate(b, "a woman walking", SampleSpec(2, 64, 64, 2, 1.0), seed=0)
    assert torch.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["train.lr=1e30"], r"diverged at step [12]: (loss nan|LoRA weights norm inf)"),
        (
            ["train.face_det_thresh=1.0"],
            "no training signal: no face was detected in the generated frames at any of the 3 steps",
        ),
    ],
)
def test_cli_a_run_without_a_usable_adapter_fails_and_writes_nothing(tmp_path, model_cache, overrides, reason):
    folder = photo_folder(tmp_path / "photos", {"astronaut.png": skimage_photo("astronaut.png")})
    sets = [arg for o in [*overrides, "train.steps=3", "eval.num_prompts=1"] for arg in ("--set", o)]
    out = tmp_path / "adapter"
    r = pv_ray("tune", "--config", str(TINY), "--images", str(folder), "--identity", "alice", "--out", str(out), *sets)
    assert r.returncode == 1, r.stderr
    assert re.search(reason, " ".join(r.stderr.split())) and "Traceback" not in r.stderr
    assert not out.exists(), "no adapter is written for a failed tuning"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("animatediff-sd15", "as shipped"), ("animatediff-sd15", "float16"), ("animatediff-lightning", "as shipped")],
)
def test_the_full_size_config_tunes_at_a_tiny_size(tmp_path, tiny_models, name, dtype):
    """A full-size config with its dtype, mixed precision, gradient checkpointing, sampler, CFG
    (sd15) or CFG-free (lightning) rollouts and rank, on the tiny weights at 128 px: finite,
    changed adapter weights."""
    from safetensors.torch import load_file

    full = ROOT / "configs" / f"{name}.yaml"
    shipped = load_config(full, [f"model.base={tiny_models}"])
    assert shipped.train.gradient_checkpointing and shipped.train.mixed_precision == "bf16"
    assert (shipped.train.guidance_scale > 1) == (name == "animatediff-sd15")
    assert shipped.model.scheduler == ("euler" if name == "animatediff-lightning" else "ddim")
    tiny_sizes = [
        f"model.base={tiny_models}",
        f"model.motion_adapter={tiny_models / 'motion_adapter'}",
        f"model.faces={tiny_models / 'faces'}",
        "video.height=128",
        "video.width=128",
        "train.height=128",
        "train.width=128",
        "train.num_frames=4",
        "train.steps=2",
        "eval.num_prompts=1",
        "eval.num_frames=2",
        "eval.num_inference_steps=4",
        "faces.det_size=512",
        "faces.det_thresh=0.2",
        "faces.min_face_size=8",
    ] + ([] if dtype == "as shipped" else [f"model.dtype={dtype}", "train.mixed_precision=fp16"])
    folder = photo_folder(tmp_path / "photos", {"astronaut.png": skimage_photo("astronaut.png")})
    out = tmp_path / "adapter"
    sets = [arg for o in tiny_sizes for arg in ("--set", o)]
    r = pv_ray(
        "tune", "--config", str(full), "--images", str(folder), "--identity", "astronaut", "--out", str(out), *sets
    )
    assert r.returncode == 0, r.stderr
    stored = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(stored) == 2 * len([k for k in stored if k.endswith(".lora.down.weight")]) > 0
    assert all(torch.isfinite(t).all() for t in stored.values())
    assert sum(float(t.abs().sum()) for k, t in stored.items() if ".lora.up." in k) > 0
    info = json.loads((out / "adapter.json").read_text())
    assert info["config"]["model"]["dtype"] == (shipped.model.dtype if dtype == "as shipped" else dtype)
    assert info["config"]["adapter"]["rank"] == 16 and np.isfinite(info["final_step"]["loss"])


def test_reference_of_only_bad_photos_is_rejected_with_every_reason(tuned):
    personalizer = tuned[0]
    with pytest.raises(IdentityRejected) as e:
        personalizer.analyzer.reference({"a.jpg": b"\xff\xd8\xff broken", "b.png": uniform_png()})
    assert "a.jpg" in str(e.value) and "b.png: no face detected" in str(e.value)


def test_identity_meta_is_validated():
    assert IdentityMeta.parse(b'{"class": "man", "prompts": ["a {cls} surfing"]}') == IdentityMeta(
        "man", ["a {cls} surfing"]
    )
    for bad, message in (
        (b"[1]", "must be a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"klass": 1}', "unknown key"),
        (b'{"class": "Man!"}', "class word"),
        (b'{"prompts": "x"}', "list of strings"),
    ):
        with pytest.raises(ValueError, match=message):
            IdentityMeta.parse(bad)


# sha256 of the weights file a seeded 3-step tune of the astronaut on `tiny` writes (2 torch
# threads, CPU, float32). Refactors must leave it byte-identical: if this changes, tuning (or the
# file format) changed. Measured on 2026-12-07 with torch 2.13.0 and the canonical file header.
PINNED_THREE_STEP_WEIGHTS = "3f47d50dbafc5b3e57d0a58501199624ffae425922ef146e4e471e6836459563"


def test_a_seeded_three_step_tune_writes_pinned_weights(tmp_path, tiny_models):
    """Also: the same tune gives the same bytes twice (safetensors' writer orders a header's
    metadata at random; the adapter folder writes it sorted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # float sums depend on how the work is split
    try:
        personalizer = Personalizer(load_config(TINY, ["train.steps=3"]))
        reference = personalizer.reference({"astronaut.png": skimage_photo("astronaut.png")})
        result = personalizer.personalize(
            "astronaut", reference, tmp_path, meta=IdentityMeta(class_word="woman"), evaluate=False
        )
    finally:
        torch.set_num_threads(threads)
    weights = (result.adapter_dir / "pytorch_lora_weights.safetensors").read_bytes()
    assert [m.step for m in result.history] == [1, 2, 3]
    assert hashlib.sha256(weights).hexdigest() == PINNED_THREE_STEP_WEIGHTS

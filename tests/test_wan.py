"""PersonalVideo on a DiT: the Wan 2.1 / 2.2 family on the tiny-wan folders (the real layout, loaded
by the same code as real weights), through the same adapter, tuner, pipeline and batch job."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from cli_service import PV_RAY
from PIL import Image

from pv_ray.backbones import load_backbone
from pv_ray.config import ConfigError, load_config
from pv_ray.errors import InputError
from pv_ray.method.personalizer import Personalizer, job_prompts
from pv_ray.method.tuner import IdentityTuning, tune_batch
from pv_ray.model.pipeline import VideoPipeline
from pv_ray.model.protocol import SampleSpec, VideoBackbone
from pv_ray.model.wan.backbone import FrameCountError
from pv_ray.presets.demo import demo_photos
from pv_ray.presets.tiny_wan import ensure_tiny_wan_models
from pv_ray.prompts import IdentityMeta
from pv_ray.schedule import flow_timesteps
from pv_ray.storage.adapter_folder import AdapterFolder

ROOT = Path(__file__).resolve().parents[1]
TINY_WAN = ROOT / "configs" / "tiny-wan.yaml"
PROMPT = "a photo of a woman smiling"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def wan21(model_cache) -> Path:
    return ensure_tiny_wan_models(version="2.1")


@pytest.fixture(scope="module")
def wan22(model_cache) -> Path:
    return ensure_tiny_wan_models(version="2.2")


def wan_config(base: Path, *overrides: str):
    return load_config(TINY_WAN, [f"model.base={base}", *overrides])


def portrait(i: int = 0) -> bytes:
    image = list(demo_photos().values())[i][0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "lora_" not in k}


def test_the_flow_sampler_s_timesteps_are_counted_as_diffusers_counts_them():
    from diffusers import UniPCMultistepScheduler

    for shift in (1.0, 3.0, 5.0):
        for steps in (1, 4, 5, 8, 30, 50):
            scheduler = UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
            )
            scheduler.set_timesteps(steps)
            assert scheduler.timesteps.tolist() == flow_timesteps(steps, shift)


def test_wan_configs_refuse_what_the_family_cannot_do():
    for overrides, said in (
        (["train.num_frames=8"], "train.num_frames=8: Wan makes 4k+1 frames"),
        (["video.height=72"], "video.height=72: Wan needs a multiple of 16"),
        (["model.scheduler=ddim"], "model.scheduler ddim is not a wan sampler: use unipc"),
        (["train.rollout_steps=4"], "(flow shift 1): timesteps 999/750/500/250 put 0 of the last 1 step(s)"),
        (["model.preset=tiny", "model.family=wan"], "model.preset tiny is not a wan model"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(TINY_WAN, overrides)


def test_the_tiny_wan_folders_are_the_real_layout_loaded_by_both_pv_ray_and_diffusers(wan21, wan22, tmp_path):
    from diffusers import WanPipeline

    from pv_ray.presets.tiny_wan import build_tiny_wan_models

    for folder, experts in ((wan21, ["transformer"]), (wan22, ["transformer", "transformer_2"])):
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
        assert (index["boundary_ratio"] == 0.875) == (len(experts) == 2)
        pipe = WanPipeline.from_pretrained(folder)
        assert (pipe.transformer_2 is not None) == (len(experts) == 2)
        backbone = load_backbone(wan_config(folder).model)
        assert isinstance(backbone, VideoBackbone) and backbone.family == "wan"
        assert len(backbone.experts) == len(experts) and backbone.record["name"] == folder.name
    again = build_tiny_wan_models(tmp_path / "again", seed=0, version="2.1")
    for part in ("transformer", "vae", "text_encoder"):
        for file in sorted((wan21 / part).glob("*.safetensors")):
            assert (again / part / file.name).read_bytes() == file.read_bytes(), "same seed, same bytes"


@pytest.mark.parametrize(
    ("overrides", "layers"),
    [
        ([], {f"attn1.{p}" for p in PROJECTIONS}),
        (
            ["adapter.cross_attention=true"],
            {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")},
        ),
        (
            ["adapter.ffn=true"],
            {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"},
        ),
    ],
)
def test_adapter_keys_are_only_on_the_configured_dit_projections(wan21, overrides, layers):
    cfg = wan_config(wan21, *overrides)
    pipeline = VideoPipeline.for_adapters(load_backbone(cfg.model), cfg.adapter)
    keys = pipeline.adapter.weights().tensors
    modules = {k.removeprefix("transformer.").rsplit(".lora.", 1)[0] for k in keys}
    assert modules == {f"blocks.{b}.{layer}" for b in (0, 1) for layer in layers}
    assert all(k.startswith("transformer.blocks.") for k in keys)


def test_tuning_changes_only_the_adapter_and_the_window_is_exact(wan21, tmp_path):
    """Base weights bit-identical after tuning; outside the window the adapted model's output equals
    the base model's exactly, inside it differs."""
    cfg = wan_config(wan21, "train.steps=3")
    personalizer = Personalizer(cfg)
    backbone = personalizer.backbone
    before = [base_weights(m) for m in (*backbone.experts, backbone.vae)]
    reference = personalizer.reference({"portrait.png": portrait()})
    result = personalizer.personalize("w", reference, tmp_path / "w", meta=IdentityMeta(class_word="woman"))
    after = [base_weights(m) for m in (*backbone.experts, backbone.vae)]
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    assert any(m.face_sim == m.face_sim for m in result.history), "a face was seen: the loss had a gradient"
    up = [t for k, t in AdapterFolder(result.adapter_dir).weights().tensors.items() if ".lora.up." in k]
    assert sum(float(t.abs().sum()) for t in up) > 0, "the adapter learned"

    generator = torch.Generator().manual_seed(0)
    latents = backbone.initial_latents(SampleSpec(5, 64, 64, 4, 1.0), generator)
    embeds = backbone.encode_prompts([PROMPT])
    threshold = personalizer.adapter.window.threshold
    with torch.no_grad():
        for t, inside in ((999.0, False), (threshold, False), (threshold - 1, True), (100.0, True)):
            adapted = backbone.predict(latents, torch.tensor(t), embeds)
            with personalizer.adapter.disabled():
                base = backbone.predict(latents, torch.tensor(t), embeds)
            assert torch.equal(adapted, base) != inside, (t, inside)


def test_k3_identities_in_one_rollout_equal_each_tuned_alone(wan21):
    from pv_ray.method.losses import IdentityLoss

    cfg = wan_config(wan21, "train.steps=2", "train.identities_per_batch=3", "train.guidance_scale=3.0")
    personalizer = Personalizer(cfg)
    references = [personalizer.reference({"p.png": portrait(i)}) for i in range(3)]
    prompts = [["a photo of a woman"], ["a photo of a man"], ["a photo of a person"]]

    def tuned(slots: list[int], which: list[int]):
        tunings = [
            IdentityTuning(slot, IdentityLoss(personalizer.analyzer, personalizer.recognizer, references[i].embedding,
                                              det_thresh=cfg.train.face_det_thresh), prompts[i])
            for slot, i in zip(slots, which)
        ]  # fmt: skip
        tune_batch(personalizer.backbone, personalizer.adapter, tunings, cfg.train, height=64, width=64)
        assert all(t.failure is None for t in tunings), [t.failure for t in tunings]
        weights = [{k: v.clone() for k, v in personalizer.adapter.weights(slot).tensors.items()} for slot in slots]
        return [[x for m in t.history for x in (m.loss, m.grad_norm)] for t in tunings], weights

    histories, together = tuned([0, 1, 2], [0, 1, 2])
    for i in range(3):
        (history,), (alone,) = tuned([0], [i])
        assert history == pytest.approx(histories[i], rel=1e-3), "the same losses and gradient norms"
        assert alone.keys() == together[i].keys()
        for key in alone:
            # AdamW moves each weight by about lr whatever its gradient's size: where a gradient is
            # near zero (this random DiT's are ~1e-6 per weight), float noise that flips its sign
            # moves the weight by a fraction of lr. Slots mixed up would differ by lr everywhere.
            torch.testing.assert_close(together[i][key], alone[key], rtol=1e-3, atol=0.1 * cfg.train.lr)


@pytest.mark.parametrize(("dtype", "precision"), [("bfloat16", "bf16"), ("float16", "fp16")])
def test_half_precision_tunes_finite(wan21, tmp_path, dtype, precision):
    cfg = wan_config(wan21, "train.steps=2", f"model.dtype={dtype}", f"train.mixed_precision={precision}")
    personalizer = Personalizer(cfg)
    reference = personalizer.reference({"portrait.png": portrait()})
    result = personalizer.personalize("h", reference, tmp_path / "h", evaluate=False)
    assert personalizer.backbone.denoiser.dtype == getattr(torch, dtype)
    weights = AdapterFolder(result.adapter_dir).weights().tensors
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(m.loss == m.loss for m in result.history)
    frames = personalizer.pipeline(PROMPT, SampleSpec(5, 64, 64, 12, 5.0), seed=0)
    assert torch.isfinite(frames).all() and frames.dtype == torch.float32


def test_decoding_the_loss_frames_gives_the_frames_of_the_whole_clip(wan21):
    backbone = load_backbone(wan_config(wan21).model)
    latents = backbone.initial_latents(SampleSpec(9, 64, 64, 4, 1.0), torch.Generator().manual_seed(1), batch=2)
    with torch.no_grad():
        whole = backbone.decode_frames(latents)
        chosen = backbone.decode_frames(latents, [[0, 3], [2, 4]])
    assert whole.shape == (2, 9, 3, 64, 64) and chosen.shape == (2, 2, 3, 64, 64)
    torch.testing.assert_close(chosen[0], whole[0, [0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen[1], whole[1, [2, 4]], rtol=1e-5, atol=1e-5)
    latents.requires_grad_(True)
    backbone.decode_frames(latents, [[1], [2]]).sum().backward()
    assert latents.grad[:, :, :2].abs().sum() > 0 and latents.grad[:, :, 2:].abs().sum() == 0, "only what is needed"
    with pytest.raises(FrameCountError, match="Wan makes 4k\\+1 frames .* got 8: use 5 or 9"):
        backbone.initial_latents(SampleSpec(8, 64, 64, 4, 1.0), torch.Generator())


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_wan_pipeline_load_lora_weights_on_the_stored_adapter_gives_pv_ray_s_frames(version, wan21, wan22, tmp_path):
    """The stored file is diffusers' Wan LoRA format: `WanPipeline.load_lora_weights` (on Wan 2.2,
    into the low-noise expert) gives the frames pv-ray generates at the same seed, with the window
    covering every step the adapted expert runs (1.0 on Wan 2.1; the boundary on Wan 2.2)."""
    from diffusers import WanPipeline

    folder, window = (wan21, "1.0") if version == "2.1" else (wan22, "0.875")
    cfg = wan_config(folder, f"adapter.active_fraction={window}")
    pipeline = VideoPipeline.for_adapters(load_backbone(cfg.model), cfg.adapter)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipeline.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    AdapterFolder(tmp_path / "adapter").write(pipeline.adapter.weights(), {"identity_id": "x"})
    spec = SampleSpec(9, 64, 64, 6, 5.0)
    ours = pipeline(PROMPT, spec, seed=3) * 0.5 + 0.5
    with pipeline.base_model():
        base = pipeline(PROMPT, spec, seed=3) * 0.5 + 0.5

    diffusers_pipe = WanPipeline.from_pretrained(folder)
    diffusers_pipe.set_progress_bar_config(disable=True)
    diffusers_pipe.load_lora_weights(tmp_path / "adapter", load_into_transformer_2=version == "2.2")
    call = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 6, "guidance_scale": 5.0}
    theirs = diffusers_pipe(PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(3),
                            output_type="pt", **call).frames[0]  # fmt: skip
    assert (ours - base).abs().max() > 0.05, "the adapter changes the frames"
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_wan22_adapter_lives_on_the_low_noise_expert_and_its_window_stays_there(wan22):
    cfg = wan_config(wan22)
    backbone = load_backbone(cfg.model)
    pipeline = VideoPipeline.for_adapters(backbone, cfg.adapter)
    assert pipeline.adapter.denoiser is backbone.experts[1]
    assert not any("lora" in name for name, _ in backbone.experts[0].named_parameters())
    with pytest.raises(InputError, match="reaches into Wan 2.2's high-noise expert .* use at most 0.875"):
        VideoPipeline.for_adapters(load_backbone(cfg.model), wan_config(wan22, "adapter.active_fraction=0.9").adapter)


def test_a_worker_with_the_job_s_prompt_embeddings_never_loads_the_text_encoder(wan21, tmp_path):
    from transformers import UMT5EncoderModel

    from pv_ray.batch.recipe import write_prompt_embeddings
    from pv_ray.model.prompt_embeddings import PromptEmbeddings

    cfg = wan_config(wan21, "train.steps=2", "eval.num_prompts=1")
    store = tmp_path / "store"
    first = write_prompt_embeddings(cfg.model_dump(mode="json"), str(store), None)
    again = write_prompt_embeddings(cfg.model_dump(mode="json"), str(store), None)
    assert not first["reused"] and again["reused"] and again["relpath"] == first["relpath"], "written once"
    encoder = UMT5EncoderModel.from_pretrained(wan21 / "text_encoder")
    assert first["text_encoder_parameters"] == sum(p.numel() for p in encoder.parameters())
    embeddings = PromptEmbeddings.from_bytes((store / first["relpath"]).read_bytes())
    assert embeddings.covers(job_prompts(cfg)) and len(embeddings) == first["prompts"]
    cached = load_backbone(cfg.model, embeddings)
    assert cached.text is None
    personalizer = Personalizer(cfg, cached)
    personalizer.personalize("c", personalizer.reference({"p.png": portrait()}), tmp_path / "c")
    assert cached.text is None, "tuned and evaluated without constructing the text encoder"

    loaded = load_backbone(cfg.model)
    prompts = [job_prompts(cfg)[5], ""]
    assert torch.equal(cached.encode_prompts(prompts), loaded.encode_prompts(prompts)), "the same rows"
    # An identity's own meta.json prompt is not in the job's cache: the encoder comes after all.
    own = "a woman in a red raincoat in the rain"
    assert own not in embeddings
    assert torch.equal(cached.encode_prompts([own]), loaded.encode_prompts([own])) and cached.text is not None
    other = load_config(TINY_WAN, ["model.seed=1"]).model
    with pytest.raises(InputError, match="made with other weights"):
        load_backbone(other, embeddings)


def test_a_request_for_a_clip_wan_cannot_make_is_refused_before_it_runs(wan21):
    from pv_ray.model.sampling import RequestError, check_request

    cfg = wan_config(wan21)
    backbone = load_backbone(cfg.model)
    check_request(cfg.limits, SampleSpec(9, 64, 64, 4, 5.0), PROMPT, backbone)
    with pytest.raises(RequestError, match=r"got 8: use 5 or 9; width must be a multiple of 16 for Wan, got 72"):
        check_request(cfg.limits, SampleSpec(8, 64, 72, 4, 5.0), PROMPT, backbone)


TINY_SIZES = [
    "video.height=64", "video.width=64", "video.num_frames=5", "video.num_inference_steps=12", "train.height=64",
    "train.width=64", "train.num_frames=5", "train.steps=2", "eval.num_prompts=1", "eval.num_frames=5",
    "eval.num_inference_steps=12", "faces.det_size=512", "faces.det_thresh=0.2", "faces.min_face_size=8",
    "train.face_det_thresh=0.1",
]  # fmt: skip


def test_the_14b_config_tunes_one_identity_with_the_semantic_consistency_loss(wan21, tmp_path):
    """`pv-ray tune` with configs/wan2.1-t2v-14b.yaml (rank 32, bf16, checkpointing, CFG) on the tiny
    weights, with the semantic consistency loss on: the base rollout runs beside the adapted one."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "p.png").write_bytes(portrait(2))
    sets = [f"model.base={wan21}", f"model.faces={wan21 / 'faces'}", *TINY_SIZES, "train.lambda_scr=0.1"]
    command = [PV_RAY, "tune", "--config", str(ROOT / "configs" / "wan2.1-t2v-14b.yaml"), "--images", str(photos),
               "--identity", "x", "--out", str(tmp_path / "x"), *(a for s in sets for a in ("--set", s))]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "x" / "adapter.json").read_text())
    assert info["config"]["adapter"]["rank"] == 32 and info["config"]["model"]["dtype"] == "bfloat16"
    assert info["final_step"]["loss_scr"] >= 0 and info["final_step"]["loss"] == info["final_step"]["loss"]
    weights = AdapterFolder(tmp_path / "x").weights()
    assert weights.rank == 32 and all(torch.isfinite(t).all() for t in weights.tensors.values())


def identity_tree(root: Path) -> Path:
    for i, name in enumerate(("ana", "ben", "cai")):
        (root / name).mkdir(parents=True)
        (root / name / "photo.png").write_bytes(portrait(i))
    (root / "cai" / "meta.json").write_text(json.dumps({"class": "person", "prompts": ["a {cls} under an umbrella"]}))
    return root


@pytest.mark.parametrize(("config", "folder"), [("wan2.1-t2v-1.3b", "wan21"), ("wan2.2-t2v-a14b", "wan22")])
def test_the_shipped_wan_config_personalizes_three_identities_on_two_workers(config, folder, request, tmp_path):
    """`pv-ray personalize` with a full-size Wan config (its dtype, sampler, checkpointing, CFG,
    identities per batch) pointed at the tiny folders: adapters, MLflow runs, report, contact sheet,
    and the text encoder run once for the job."""
    base = request.getfixturevalue(folder)
    shipped = load_config(ROOT / "configs" / f"{config}.yaml", [f"model.base={base}"])
    assert shipped.model.dtype == "bfloat16" and shipped.train.gradient_checkpointing
    assert shipped.train.identities_per_batch == (2 if config.startswith("wan2.2") else 1)
    sets = [f"model.base={base}", f"model.faces={base / 'faces'}", *TINY_SIZES]
    out = tmp_path / "out"
    command = [PV_RAY, "personalize", "--config", str(ROOT / "configs" / f"{config}.yaml"),
               "--input", str(identity_tree(tmp_path / "people")), "--output", str(out), "--workers", "2",
               "--contact-sheet", *(a for s in sets for a in ("--set", s))]  # fmt: skip
    r = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    said = r.stdout + r.stderr
    assert r.returncode == 0, said[-4000:]
    assert "3 identities: 3 tuned" in said
    report = json.loads((out / "report.json").read_text())
    assert {i: e["status"] for i, e in report["identities"].items()} == dict.fromkeys(("ana", "ben", "cai"), "done")
    cache = report["prompt_embeddings"]
    assert cache["prompts"] > 100 and not cache["reused"] and cache["text_encoder_parameters"] > 0
    assert (out / cache["uri"].rsplit("/", 2)[-2] / cache["uri"].rsplit("/", 1)[-1]).is_file()
    for identity in ("ana", "ben", "cai"):
        info = json.loads((out / "adapters" / identity / "adapter.json").read_text())
        assert info["backbone"]["family"] == "wan" and info["config"]["model"]["dtype"] == "bfloat16"
        weights = AdapterFolder(out / "adapters" / identity).weights().tensors
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert all(k.startswith("transformer.blocks.") and ".attn1." in k for k in weights)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height > 3 * 64
    from mlflow import MlflowClient

    # The adapter on its own backbone, as `pv-ray generate` runs it (the recorded config); and a
    # clip length the causal VAE cannot make is one line, exit 2.
    clip = [PV_RAY, "generate", "--adapter", str(out / "adapters" / "ana"), "--prompt", "a woman walking"]
    made = subprocess.run([*clip, "--frames", "5", "--out", "ana.gif"], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0 and (tmp_path / "ana.gif").stat().st_size > 0, made.stderr[-2000:]
    refused = subprocess.run([*clip, "--frames", "4", "--out", "x.gif"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "Wan makes 4k+1 frames (5, 9, 33, 81), got 4" in refused.stderr

    client = MlflowClient(report["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.identity_id != ''")
    assert sorted(run.data.tags["identity_id"] for run in runs) == ["ana", "ben", "cai"]

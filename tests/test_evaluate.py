"""`pv-ray evaluate`: a store of two tuned identities (plus one legacy adapter) on the tiny preset."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pv_ray.config import load_config
from pv_ray.evaluation.clip_alignment import ClipTextAlignment
from pv_ray.evaluation.clips import INDEPENDENT, METRICS, TEXT_ALIGNMENT
from pv_ray.evaluation.judge import judge_available
from pv_ray.evaluation.store_evaluation import REPORT_NAME, VARIANTS, evaluate_store, open_evaluation
from pv_ray.method.personalizer import Personalizer
from pv_ray.prompts import IdentityMeta
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# Fast: 2 tuning steps, one held-out prompt of 2 frames. Evaluation keeps 4 denoising steps: with
# trailing spacing only the last one (t = 249) is inside the adapter's isolation window.
OVERRIDES = [
    "train.steps=2",
    "train.num_frames=2",
    "eval.num_prompts=1",
    "eval.num_frames=2",
    "eval.num_inference_steps=4",
]


def photos() -> dict[str, tuple[bytes, str]]:
    import insightface
    import skimage

    return {
        "astronaut": ((Path(skimage.data.__file__).parent / "astronaut.png").read_bytes(), "woman"),
        "tom": ((Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png").read_bytes(), "man"),
    }


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_models, tiny_clip):
    """A store with astronaut, tom and `legacy` (an adapter.json without reference_embedding), evaluated."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(TINY, OVERRIDES)
    store = AdapterStore(str(tmp / "store"))
    personalizer = Personalizer(cfg)
    references = {}
    for identity_id, (photo, class_word) in photos().items():
        reference = personalizer.reference({f"{identity_id}.png": photo})
        references[identity_id] = reference.embedding
        personalizer.personalize(
            identity_id, reference, tmp / identity_id, meta=IdentityMeta(class_word=class_word), evaluate=False
        )
        store.put(identity_id, tmp / identity_id)
    legacy = tmp / "legacy"
    shutil.copytree(tmp / "astronaut", legacy)
    info = json.loads((legacy / "adapter.json").read_text())
    del info["reference_embedding"]
    info["identity_id"] = "legacy"
    (legacy / "adapter.json").write_text(json.dumps(info))
    store.put("legacy", legacy)
    del personalizer
    tracking_uri = f"sqlite:///{tmp / 'm.db'}"
    seen = []
    cfg = load_config(TINY, [*OVERRIDES, f"eval.clip_model={tiny_clip}"])
    report = evaluate_store(
        cfg, str(tmp / "store"), tracking_uri=tracking_uri, on_identity=lambda r: seen.append(r.identity_id)
    )
    written = store.root.read_json(REPORT_NAME)  # read now: the CLI test below rewrites it
    return {
        "tmp": tmp,
        "store": store,
        "report": report,
        "json": written,
        "tracking_uri": tracking_uri,
        "seen": seen,
        "references": references,
    }


def test_adapter_json_records_the_reference_embedding(evaluated):
    info = evaluated["store"].get("tom").metadata
    assert len(info["reference_embedding"]) == 512
    np.testing.assert_allclose(info["reference_embedding"], evaluated["references"]["tom"], atol=1e-6)
    assert "reference_embedding" in info["sha256"]


def test_report_has_base_adapted_and_delta_per_identity(evaluated):
    report = evaluated["json"]
    assert evaluated["seen"] == ["astronaut", "legacy", "tom"]
    assert report["counts"] == {"done": 2, "skipped": 1, "failed": 0}
    changed = faces_found = 0
    for identity_id in ("astronaut", "tom"):
        entry = report["identities"][identity_id]
        assert entry["status"] == "done" and entry["eval_prompts"] and entry["run_id"]
        for metric in (*METRICS, TEXT_ALIGNMENT):
            base, adapted, delta = (entry[v][metric] for v in VARIANTS)
            if metric == "face_sim" and (base is None or adapted is None):
                continue  # no face in any frame: reported as null, never as a number
            assert all(math.isfinite(x) for x in (base, adapted, delta)), (identity_id, metric)
            faces_found += metric == "face_sim"
            assert delta == pytest.approx(adapted - base, abs=1e-12)
            changed += base != adapted
    assert changed > 0, "the adapter changed nothing: base and adapted are the same model"
    assert faces_found > 0, "no face in any evaluation frame: face_sim was never compared"
    # The identities' targets differ, so the same frames are scored against different embeddings.
    assert report["identities"]["astronaut"]["eval_prompts"] != report["identities"]["tom"]["eval_prompts"]


def test_summary_is_mean_and_std_over_identities(evaluated):
    report = evaluated["json"]
    done = [report["identities"][i] for i in ("astronaut", "tom")]
    assert set(report["summary"]) == {*METRICS, TEXT_ALIGNMENT} | ({INDEPENDENT} if judge_available() else set())
    assert report["independent_judge"].startswith("dlib ResNet" if judge_available() else "not installed")
    for metric in report["summary"]:
        for variant in VARIANTS:
            values = [e[variant][metric] for e in done if e[variant][metric] is not None]
            stats = report["summary"][metric][variant]
            assert stats["n"] == len(values)
            if values:
                assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-12)
                assert stats["std"] == pytest.approx(np.std(values), abs=1e-12)
    assert report["clip_text_alignment"].startswith("CLIP model ")
    assert report["summary"][TEXT_ALIGNMENT]["adapted"]["n"] == 2


def test_clip_text_alignment_is_the_mean_frame_to_prompt_cosine(tiny_clip):
    """The score is the mean over frames of cos(image embedding, prompt embedding), with the
    embeddings computed here from the CLIP towers and projections themselves."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipTextAlignment(tiny_clip)
    clip = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prompt = "a woman riding a bicycle"
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        text_inputs = processor(text=[prompt], return_tensors="pt", padding=True)
        text = model.text_projection(model.text_model(**text_inputs).pooler_output)
        pixels = processor(images=list(clip), return_tensors="pt")["pixel_values"]
        images = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    expected = float(torch.nn.functional.cosine_similarity(images, text).mean())
    score = scorer(clip, prompt)
    assert score == pytest.approx(expected, abs=1e-5)
    assert np.mean([scorer(clip[i : i + 1], prompt) for i in range(3)]) == pytest.approx(score, abs=1e-5)
    assert scorer(clip[::-1].copy(), prompt) == pytest.approx(score, abs=1e-5)
    assert scorer(clip, "a man cooking pasta") != pytest.approx(score, abs=1e-6)


def test_clip_model_must_be_a_local_clip_folder(tmp_path, evaluated):
    cfg = load_config(TINY, [f"eval.clip_model={tmp_path}"])
    with pytest.raises(ValueError, match="not a local CLIP model folder .missing config.json, model.safetensors"):
        open_evaluation(cfg, str(evaluated["tmp"] / "store"))


def test_adapter_without_reference_embedding_is_skipped_with_reason(evaluated):
    entry = evaluated["report"].identities["legacy"]
    assert entry.status == "skipped" and "reference_embedding" in entry.reason
    assert entry.base == {} and entry.run_id is None


def test_mlflow_has_one_nested_run_per_identity(evaluated):
    report = evaluated["report"]
    tracker = Tracker(evaluated["tracking_uri"])
    runs = tracker.find_identity_runs(report.evaluation_id)
    assert [r.data.tags["identity_id"] for r in runs] == ["astronaut", "tom"]
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == report.run_id
        result = report.identities[run.data.tags["identity_id"]]
        expected = {f"{m}_{v}": getattr(result, v)[m] for m in (*METRICS, TEXT_ALIGNMENT) for v in VARIANTS}
        assert run.data.metrics == pytest.approx({k: v for k, v in expected.items() if math.isfinite(v)})
        assert {f"{m}_{v}" for m in METRICS[1:] for v in VARIANTS} <= set(run.data.metrics)
    parent = tracker.client.get_run(report.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["pv_ray.task"] == "evaluate"
    assert parent.data.metrics["identities_done"] == 2 and parent.data.metrics["identities_skipped"] == 1
    assert parent.data.metrics["dynamic_degree_adapted_mean"] == pytest.approx(
        report.summary["dynamic_degree"]["adapted"]["mean"]
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pv_ray", "evaluate", *args], capture_output=True, text=True, timeout=300
    )


def test_unknown_identity_exits_2_with_one_line(evaluated):
    store = str(evaluated["tmp"] / "store")
    result = run_cli("--config", str(TINY), "--store", store, "--identities", "tom,nobody")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no complete adapter for nobody in" in lines[0], lines


def test_cli_evaluates_listed_identities(evaluated):
    tmp = evaluated["tmp"]
    result = run_cli(
        "--config",
        str(TINY),
        "--store",
        str(tmp / "store"),
        "--identities",
        "tom",
        "--tracking-uri",
        f"sqlite:///{tmp / 'cli.db'}",
        *(x for o in OVERRIDES for x in ("--set", o)),
    )
    assert result.returncode == 0, result.stderr
    report = evaluated["store"].root.read_json(REPORT_NAME)
    assert list(report["identities"]) == ["tom"] and report["identities"]["tom"]["status"] == "done"
    assert "face_sim" in result.stderr and "1 evaluated, 0 skipped" in result.stderr
    assert report["clip_text_alignment"].startswith("not configured") and TEXT_ALIGNMENT not in report["summary"]

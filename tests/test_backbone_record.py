"""Every adapter records the backbone weights it was tuned on, and nothing runs it on others: a
store tuned on `tiny-prior` is refused, in one line naming both, by `serve`, `evaluate` and
`generate` given `configs/tiny.yaml` (before this, they applied it to the random `tiny` weights
without a word and made colour noise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_PRIOR = ROOT / "configs" / "tiny-prior.yaml"


@pytest.fixture(scope="module")
def prior_store(tmp_path_factory, tiny_models, tiny_prior_models) -> Path:
    """A store of two adapters tuned (here: drawn at random) on the tiny-prior backbone."""
    from pv_ray.backbones import load_backbone
    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters

    root = tmp_path_factory.mktemp("prior-store")
    cfg = load_config(TINY_PRIOR)
    write_random_adapters(load_backbone(cfg.model), cfg, str(root), ["alice", "bob"], scale=0.3)
    return root


def test_the_record_tells_backbones_apart_and_names_both():
    from pv_ray.backbones import configured_backbone_record as backbone_record
    from pv_ray.config import load_config
    from pv_ray.storage.adapter_folder import backbone_mismatch

    tiny, prior = (backbone_record(load_config(c).model) for c in (TINY, TINY_PRIOR))
    assert tiny == backbone_record(load_config(TINY).model), "the same weights give the same record"
    assert tiny["family"] == prior["family"] == "animatediff" and tiny["fingerprint"] != prior["fingerprint"]
    other_seed = backbone_record(load_config(TINY, ["model.seed=1"]).model)
    assert other_seed["fingerprint"] != tiny["fingerprint"], "the same architecture with other weights differs"
    assert backbone_mismatch({"backbone": tiny}, tiny) is None
    assert backbone_mismatch({"identity_id": "old"}, tiny) is None, "an adapter from before the record runs"
    why = backbone_mismatch({"backbone": prior}, tiny)
    assert why.startswith("it was tuned on backbone 'tiny-prior' (animatediff, weights ")
    assert "not on this config's 'tiny' (animatediff, weights " in why


@pytest.mark.parametrize("command", ["serve", "evaluate"])
def test_serve_and_evaluate_refuse_a_store_tuned_on_another_backbone_in_one_line(prior_store, command, tmp_path):
    from typer.testing import CliRunner

    from pv_ray.cli import app

    refused = CliRunner().invoke(app, [command, "--config", str(TINY), "--store", str(prior_store)])
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 2 and len(lines) == 1, refused.output
    assert "adapter 'alice'" in lines[0] and "'tiny-prior'" in lines[0] and "this config's 'tiny'" in lines[0]
    assert "use the config it was tuned with" in lines[0]


def run_cli(*args: str):
    from typer.testing import CliRunner

    from pv_ray.cli import app

    return CliRunner().invoke(app, list(args))


def test_without_config_an_adapter_runs_on_the_backbone_it_was_tuned_on(prior_store, tmp_path):
    adapter = str(prior_store / "adapters" / "alice")
    args = ["generate", "--prompt", "a person", "--adapter", adapter, "--frames", "2", "--steps", "2"]
    recorded = run_cli(*args, "--out", str(tmp_path / "recorded.gif"))
    given = run_cli(*args, "--out", str(tmp_path / "given.gif"), "--config", str(TINY_PRIOR))
    assert recorded.exit_code == 0 and given.exit_code == 0, recorded.output + given.output
    assert (tmp_path / "recorded.gif").read_bytes() == (tmp_path / "given.gif").read_bytes()
    # --set applies on top of the recorded config, and a bad one names itself.
    bad = run_cli(*args, "--out", str(tmp_path / "bad.gif"), "--set", "video.num_frame=3")
    assert bad.exit_code == 2 and "--set 'video.num_frame=3': unknown key" in bad.output, bad.output
    assert "did you mean 'video.num_frames'" in bad.output


def test_allow_other_backbone_is_the_deliberate_way_past_the_refusal(prior_store, tmp_path):
    adapter = str(prior_store / "adapters" / "alice")
    out = tmp_path / "other.gif"
    args = [
        "generate",
        "--prompt",
        "a person",
        "--adapter",
        adapter,
        "--frames",
        "2",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    made = run_cli(*args, "--config", str(TINY), "--allow-other-backbone")
    assert made.exit_code == 0 and out.is_file(), made.output


def test_tune_into_a_store_leaves_no_copy_and_evaluate_takes_its_config(prior_store, tmp_path, monkeypatch):
    import tempfile

    from pv_ray.presets.demo import demo_photos
    from pv_ray.storage.adapter_store import AdapterStore

    photos = tmp_path / "photos"
    photos.mkdir()
    portrait, _ = next(iter(demo_photos().values()))
    portrait.save(photos / "me.png")
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_tmp))  # where the tuned folder passes through
    store = tmp_path / "store"
    fast = ["--set", "train.steps=1", "--set", "eval.num_prompts=1", "--set", "eval.num_frames=2"]
    tune = ["tune", "--config", str(TINY), "--images", str(photos), "--identity", "me", "--store", str(store), *fast]

    made = run_cli(*tune)
    assert made.exit_code == 0, made.output
    record = AdapterStore(str(store)).get("me")
    assert record.metadata["identity_id"] == "me" and record.metadata["backbone"]["name"] == "tiny"
    assert list(scratch_tmp.iterdir()) == [], "the adapter folder (reference embeddings) left behind"
    # Evaluated without --config: with the config it was tuned with (its --set included).
    evaluated = run_cli("evaluate", "--store", str(store))
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((store / "evaluation.json").read_text())
    assert report["identities"]["me"]["status"] == "done", report["identities"]["me"]
    refused = run_cli("evaluate", "--store", str(store), "--config", str(TINY_PRIOR))
    assert refused.exit_code == 2 and "this config's 'tiny-prior'" in refused.output, refused.output

    again = run_cli(*tune)
    assert again.exit_code == 2 and "pass --force to replace it" in again.output, again.output
    assert run_cli(*tune, "--force").exit_code == 0
    both = run_cli(*tune, "--out", str(tmp_path / "folder"))
    assert both.exit_code == 2 and "one of them" in both.output
    other = run_cli(*tune[:-6], "--store", str(prior_store), *fast)  # a store of tiny-prior adapters
    assert other.exit_code == 2 and "'tiny-prior'" in other.output, other.output
    assert not (prior_store / "adapters" / "me").exists()


def test_generate_refuses_an_adapter_of_another_backbone(prior_store, tmp_path):
    from typer.testing import CliRunner

    from pv_ray.cli import app

    adapter = prior_store / "adapters" / "alice"
    assert json.loads((adapter / "adapter.json").read_text())["backbone"]["name"] == "tiny-prior"
    args = ["generate", "--prompt", "a person", "--adapter", str(adapter), "--out", str(tmp_path / "a.gif")]
    args += ["--frames", "2", "--steps", "1"]
    refused = CliRunner().invoke(app, [*args, "--config", str(TINY)])
    assert refused.exit_code == 2 and "'tiny-prior'" in refused.output, refused.output
    assert not (tmp_path / "a.gif").exists()
    made = CliRunner().invoke(app, [*args, "--config", str(TINY_PRIOR)])
    assert made.exit_code == 0 and (tmp_path / "a.gif").is_file(), made.output

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
    from pv_ray.config import load_config
    from pv_ray.presets.tiny import write_random_adapters

    root = tmp_path_factory.mktemp("prior-store")
    write_random_adapters(load_config(TINY_PRIOR), str(root), ["alice", "bob"], scale=0.3)
    return root


def test_the_record_tells_backbones_apart_and_names_both():
    from pv_ray.config import load_config
    from pv_ray.model.backbone import backbone_record
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

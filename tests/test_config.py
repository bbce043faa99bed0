"""Config loading: documented values survive the command line, paths become absolute, the
isolation window is counted once, and every shipped config validates."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler

from pv_ray.config import ConfigError, PVConfig, load_config, parse_override
from pv_ray.schedule import IsolationWindow, lcm_timesteps, sampler_timesteps, spaced_timesteps

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def literal_fields():
    """(section, key, value) for every value of every Literal-typed field of the config."""
    for section, info in PVConfig.model_fields.items():
        model = typing.get_args(info.annotation)[0] if typing.get_origin(info.annotation) else info.annotation
        for key, field in model.model_fields.items():
            for arg in (field.annotation, *typing.get_args(field.annotation)):
                if typing.get_origin(arg) is typing.Literal:
                    for value in typing.get_args(arg):
                        yield section, key, value


@pytest.mark.parametrize(("section", "key", "value"), list(literal_fields()))
def test_every_documented_value_can_be_set_from_the_command_line(section, key, value):
    """YAML 1.1 reads no/yes/on/off as booleans; pv-ray reads them as the words they are."""
    assert parse_override(f"{section}.{key}={value}")[1] == value
    overrides = [f"{section}.{key}={value}"] + (["model.preset=tiny"] if section != "model" else [])
    if (section, key) == ("model", "preset") and value is None:
        overrides.append("model.base=/models/sd15")
    if (section, key, value) == ("model", "scheduler", "lcm"):
        overrides.append("adapter.active_fraction=0.3")  # LCM's last of 4 steps is t = 259
    wan = (section, key, value) in {
        ("model", "family", "wan"), ("model", "preset", "tiny-wan"), ("model", "preset", "tiny-wan2.2"),
        ("model", "scheduler", "unipc"),
    }  # fmt: skip
    cfg = load_config(ROOT / "configs" / "tiny-wan.yaml" if wan else TINY, overrides)
    assert getattr(getattr(cfg, section), key) == value


def test_mixed_precision_no_in_a_file_and_real_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        TINY.read_text().replace("train:\n", "train:\n  mixed_precision: no\n  gradient_checkpointing: false\n")
    )
    cfg = load_config(path, ["adapter.cross_attention=true"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is False
    assert cfg.adapter.cross_attention is True
    assert parse_override("train.mixed_precision=no")[1] == "no" and parse_override("a.b=False")[1] is False


def test_one_half_precision_type_at_a_time():
    with pytest.raises(
        ConfigError,
        match="train.mixed_precision=bf16 does not match model.dtype=float16: use train.mixed_precision=fp16",
    ):
        load_config(TINY, ["model.dtype=float16", "train.mixed_precision=bf16"])
    assert load_config(TINY, ["model.dtype=bfloat16", "train.mixed_precision=bf16"]).model.dtype == "bfloat16"
    assert load_config(TINY, ["model.dtype=float32", "train.mixed_precision=fp16"]).train.mixed_precision == "fp16"


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_spaced_timesteps_are_ddim_s(spacing):
    for steps in range(1, 13):
        scheduler = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        assert spaced_timesteps(steps, spacing) == scheduler.timesteps.tolist(), (spacing, steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_sampler_timesteps_are_those_of_every_configurable_scheduler(spacing):
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    for steps in (1, 2, 4, 6, 8, 25):
        for name, kind in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler), ("lcm", LCMScheduler)):
            scheduler = kind(num_train_timesteps=1000, steps_offset=1, timestep_spacing=spacing)
            scheduler.set_timesteps(steps)
            expected = scheduler.timesteps.double()
            assert torch.allclose(torch.tensor(sampler_timesteps(name, steps, spacing)).double(), expected), name
    assert lcm_timesteps(4) == [999, 759, 499, 259]  # LCM's own grid: no step below 250 at 4 steps


def test_a_rollout_with_no_gradient_step_in_the_window_is_refused_at_load():
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["train.rollout_steps=3"])
    message = str(info.value)
    assert "\n" not in message
    assert "train.rollout_steps=3 (trailing spacing): timesteps 999/666/332 put 0 of the last 1 step(s)" in message
    assert "0 of the last 1 step(s)" in message and "t < 250" in message
    assert load_config(TINY, ["train.rollout_steps=3", "adapter.active_fraction=0.34"]).train.rollout_steps == 3
    assert load_config(TINY, ["train.rollout_steps=8", "train.grad_steps=2"]).train.grad_steps == 2
    assert IsolationWindow(0.25).count(spaced_timesteps(8, "trailing")) == 2


def test_the_window_is_counted_on_the_configured_sampler_s_timesteps():
    with pytest.raises(ConfigError, match=r"train.rollout_steps=4 \(lcm\): timesteps 999/759/499/259 put 0 of"):
        load_config(TINY, ["model.scheduler=lcm"])
    assert load_config(TINY, ["model.scheduler=lcm", "adapter.active_fraction=0.3"]).model.scheduler == "lcm"
    assert load_config(TINY, ["model.scheduler=euler"]).model.scheduler == "euler"


def test_local_paths_become_absolute_where_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        TINY,
        [
            "train.prompts_file=prompts/train.txt",
            "eval.prompts_file=~/eval.txt",
            "model.base=models/sd15",
            "eval.clip_model=s3://b/clip",
        ],
    )
    assert cfg.train.prompts_file == str(tmp_path / "prompts" / "train.txt")
    assert cfg.eval.prompts_file == str(Path.home() / "eval.txt")
    assert cfg.model.base == str(tmp_path / "models" / "sd15")
    assert cfg.eval.clip_model == "s3://b/clip"  # a URI stays as it is


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.steps >= 1 and cfg.model.dtype in ("float32", "float16", "bfloat16")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["video.num_frame=3"],
            "--set 'video.num_frame=3': unknown key 'video.num_frame' (did you mean 'video.num_frames'?)",
        ),
        (["vide.num_frames=3"], "--set 'vide.num_frames=3': unknown key 'vide' (did you mean 'video'?)"),
        (
            ["video.num_frames=0"],
            "--set 'video.num_frames=0': video.num_frames: Input should be greater than or equal to 1",
        ),
        (["train.zzz=1"], "--set 'train.zzz=1': unknown key 'train.zzz'"),
    ],
)
def test_a_bad_set_is_blamed_on_the_set_with_the_closest_key(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert str(raised.value) == message


def test_a_bad_key_in_the_file_is_blamed_on_the_file(tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["faces"]["max_photo"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    expected = f"{bad}: unknown key 'faces.max_photo' (did you mean 'faces.max_photo_bytes'?)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(bad, ["video.num_frames=2"])


def test_the_window_check_is_one_question_for_config_and_tuner():
    from pv_ray.schedule import IsolationWindow

    window = IsolationWindow(0.25)
    assert window.misses_gradient_steps([999, 749, 499, 249], 1) is None
    assert "1 of the last 2 step(s)" in window.misses_gradient_steps([999, 749, 499, 249], 2)
    assert IsolationWindow(1.0).misses_gradient_steps([999], 1) is None

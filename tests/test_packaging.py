"""The package as pip builds it: packages found (not listed), every data file pv-ray reads at run
time inside the wheel, and no setuptools warning on the way (a fresh `make setup` is quiet)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_builds_without_warnings_and_holds_the_run_time_data(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    source = tmp_path / "source"
    for name in tracked.splitlines():  # a copy of the checkout: the build writes beside its sources
        path = ROOT / name
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            (source / name).symlink_to(path.readlink())
        elif path.is_file():
            shutil.copy2(path, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    # Byte-compiling is off under pytest (no .pyc written): setuptools says so as a "warning".
    lines = (build.stdout + build.stderr).splitlines()
    warnings = [line for line in lines if "warning" in line.lower() and "byte-compiling is disabled" not in line]
    assert not warnings, "\n".join(warnings[:10])
    (wheel,) = tmp_path.glob("pv_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "pv_ray/configs/tiny-prior.yaml",  # the embedded default config
        "pv_ray/presets/tiny_prior/unet/diffusion_pytorch_model.safetensors",
        "pv_ray/presets/tiny_prior/train_log.json",
        "pv_ray/prompt_templates/train_templates.yaml",
        "pv_ray/prompt_templates/eval_prompts.txt",
        "serving/page/index.html",
        "serving/page/app.js",
        "serving/config.yaml",
        "pv_ray/cluster/batch.py",
        "serving/generator.py",
    }
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith(("tests/", "jobs/", "docs/")) for name in names)

"""Hostile and careless input: one odd photo, meta.json or folder name fails only itself.

The batch job as users run it (`pv-ray personalize` in a subprocess, a driver of the test's local
Ray cluster) over a folder set full of inputs that once failed the whole batch or reached the
terminal as markup and escape sequences; then a RuntimeError injected into one identity's
analysis in the cluster's worker processes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_service import PV_RAY
from PIL import Image

from pv_ray.presets.demo import demo_photos
from pv_ray.prompts import IdentityMeta, PromptFileError
from pv_ray.terminal import terminal_safe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.steps=1", "eval.num_prompts=1", "eval.num_frames=2", "eval.num_inference_steps=2"]
MARKUP_PHOTO = "[bold red]x.jpg"  # rendered as markup, it would print as a red "x.jpg"
ESCAPE_PHOTO = "a\x1b[31mb.jpg"  # printed raw, it would turn the terminal red
MARKUP_FOLDER = "[reverse]evil"
ESCAPE_FOLDER = "x\x1b[2Jy"  # ESC [2J clears the screen


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces() -> list[Image.Image]:
    return [portrait for portrait, _ in demo_photos().values()]


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    """The address of the test's cluster, for drivers started as subprocesses."""
    import ray

    return ray.get_runtime_context().gcs_address


def write(root: Path, tree: dict[str, bytes]) -> None:
    for path, data in tree.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


def test_odd_inputs_fail_only_themselves_with_a_reason(tmp_path, faces, ray_address):
    grey = Image.new("RGB", (128, 128), (120, 120, 120))  # a valid photo without a face
    write(
        tmp_path / "in",
        {
            "good-a/photo.png": encoded(faces[0], "PNG"),
            "good-b/photo.jpg": encoded(faces[1], "JPEG"),
            "strip/face.png": encoded(faces[2], "PNG"),
            "strip/wide.png": encoded(Image.new("RGB", (4000, 1), "white"), "PNG"),  # cv2.error in the detector
            "speck/tall.png": encoded(Image.new("RGB", (1, 3000), "white"), "PNG"),
            "nested/photo.png": encoded(faces[3], "PNG"),
            "nested/meta.json": b"[" * 60_000,  # RecursionError in the JSON parser
            "tiff/photo.jpg": encoded(faces[0], "TIFF"),
            "eps/photo.jpg": encoded(faces[0], "EPS"),  # Pillow hands EPS to Ghostscript
            "Alice/photo.png": encoded(faces[0], "PNG"),
            "alice/photo.png": encoded(faces[1], "PNG"),
            "CON/photo.png": encoded(faces[2], "PNG"),
            f"markup/{MARKUP_PHOTO}": encoded(grey, "JPEG"),
            f"markup/{ESCAPE_PHOTO}": encoded(grey, "JPEG"),
            f"{MARKUP_FOLDER}/photo.png": encoded(faces[3], "PNG"),
            f"{ESCAPE_FOLDER}/photo.png": encoded(faces[3], "PNG"),
        },
    )
    sets = [arg for override in FAST for arg in ("--set", override)]
    r = subprocess.run(
        [PV_RAY, "personalize", "--config", str(TINY), "--input", "in", "--output", "out", "--workers", "1", *sets],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ray_address, "COLUMNS": "400"},  # a wide table: no cell is wrapped
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = r.stdout + r.stderr
    assert r.returncode == 0, output
    assert "Traceback" not in output, output

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    status = {i: e["status"] for i, e in report["identities"].items()}
    assert status == {
        "good-a": "done",
        "good-b": "done",
        "strip": "done",
        **dict.fromkeys(
            ["speck", "nested", "tiff", "eps", "Alice", "alice", "CON", "markup", MARKUP_FOLDER, ESCAPE_FOLDER],
            "rejected",
        ),
    }, output
    assert report["error"] is None and report["counts"]["failed"] == 0
    rejects = json.loads((tmp_path / "out" / "rejects.json").read_text())["rejects"]
    reason = {(r["identity_id"], r["photo"]): r["reason"] for r in rejects}
    assert reason[("strip", "wide.png")] == "image too small (4000 x 1; each side must be at least 32 px)"
    assert "tall.png: image too small (1 x 3000" in reason[("speck", None)]
    assert reason[("nested", None)].startswith("nested/meta.json: nested too deeply")
    assert "photo.jpg: not a supported image format (TIFF;" in reason[("tiff", None)]
    assert "photo.jpg: not a supported image format (PostScript/EPS;" in reason[("eps", None)]
    assert "'Alice' differs only in case from 'alice'" in reason[("Alice", None)]
    assert "'alice' differs only in case from 'Alice'" in reason[("alice", None)]
    assert "'CON' is a reserved device name on Windows" in reason[("CON", None)]
    assert f"{MARKUP_PHOTO}: no face detected" in reason[("markup", None)]
    assert f"{ESCAPE_PHOTO}: no face detected" in reason[("markup", None)]
    assert all("invalid identity id" in reason[(folder, None)] for folder in (MARKUP_FOLDER, ESCAPE_FOLDER))
    for identity_id, entry in report["identities"].items():
        assert entry["status"] == "done" or entry["reason"], identity_id

    # User-given names are shown as written: markup literally, control characters as visible escapes.
    assert MARKUP_PHOTO in output and MARKUP_FOLDER in output
    assert "a\\x1b[31mb.jpg" in output and "x\\x1b[2Jy" in output
    assert "\x1b" not in output, "no escape sequence from a file name reaches the terminal"
    assert "3 tuned" in output and "10 rejected" in output


@pytest.mark.parametrize(
    "tree, input_name, message",
    [
        ({}, "nope", "--input nope: folder not found"),
        ({"in/.keep": None}, "in", "--input in: the folder is empty"),
        ({"in/alice/a.png": b"x", "in/alice/b.jpg": b"x"}, "in/alice", "it looks like one identity's folder"),
    ],
    ids=["missing", "empty", "one-identity"],
)
def test_personalize_refuses_an_input_root_it_cannot_use_in_one_line_writing_nothing(
    tmp_path, monkeypatch, tree, input_name, message
):
    from typer.testing import CliRunner

    from pv_ray.cli import app

    for path in tree:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        if tree[path] is not None:
            (tmp_path / path).write_bytes(tree[path])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["personalize", "--config", str(TINY), "--input", input_name, "--output", "out"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "a refused run wrote something"


def test_a_batch_that_tunes_nothing_exits_1(tmp_path, ray_address):
    """Every identity rejected: the table and the reasons, then a failure, not a success."""
    write(tmp_path / "in", {"grey/photo.png": encoded(Image.new("RGB", (128, 128), (120, 120, 120)), "PNG")})
    sets = [arg for override in FAST for arg in ("--set", override)]
    r = subprocess.run(
        [PV_RAY, "personalize", "--config", str(TINY), "--input", "in", "--output", "out", "--workers", "1", *sets],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ray_address, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = r.stdout + r.stderr
    assert r.returncode == 1, output
    assert "no identity was tuned (0 failed, 1 rejected)" in output and "no face detected" in output, output
    assert "Traceback" not in output


def test_an_unexpected_error_in_one_identitys_analysis_fails_it_alone(tmp_path, faces, ray_address):
    """A RuntimeError raised by the analysis of one identity, in the cluster's worker processes:
    that identity is failed with the reason, the others are tuned, and the batch ends normally
    (it used to fail the Ray Data map, and every identity with it)."""
    from analysis_fault import TRIGGER

    write(
        tmp_path / "in",
        {
            "steady/photo.png": encoded(faces[0], "PNG"),
            "faulty/photo.png": encoded(faces[1], "PNG"),
            f"faulty/{TRIGGER}": encoded(faces[1], "PNG"),
            "sturdy/photo.png": encoded(faces[2], "PNG"),
        },
    )
    driver = Path(__file__).with_name("analysis_fault.py")
    r = subprocess.run(
        [sys.executable, str(driver), ray_address, str(tmp_path / "in"), str(tmp_path / "out"), str(TINY), *FAST],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {i: e["status"] for i, e in report["identities"].items()} == {
        "steady": "done",
        "sturdy": "done",
        "faulty": "failed",
    }
    assert report["identities"]["faulty"]["reason"] == (
        "analysis failed (RuntimeError: injected fault in the reference analysis)"
    )
    assert report["error"] is None


def test_tune_answers_the_same_inputs_with_one_line_and_exit_2(tmp_path, faces, tiny_models):
    """`pv-ray tune` on one identity: no usable photo among the odd ones, or a meta.json nested
    60,000 deep, is an input error (one line, exit 2), never a traceback."""
    write(
        tmp_path,
        {
            "odd/wide.png": encoded(Image.new("RGB", (4000, 1), "white"), "PNG"),
            "odd/tall.png": encoded(Image.new("RGB", (1, 3000), "white"), "PNG"),
            "odd/tiff.jpg": encoded(faces[0], "TIFF"),
            f"odd/{ESCAPE_PHOTO}": encoded(faces[0], "EPS"),
            "nested/photo.png": encoded(faces[0], "PNG"),
            "nested/meta.json": b"[" * 60_000,
        },
    )
    expected = {
        "odd": "error: no usable reference photo (a\\x1b[31mb.jpg: not a supported image format (PostScript/EPS; "
        "supported: JPEG, PNG, WebP); tall.png: image too small (1 x 3000; each side must be at least 32 px); "
        "tiff.jpg: not a supported image format (TIFF; supported: JPEG, PNG, WebP); wide.png: image too small "
        "(4000 x 1; each side must be at least 32 px))",
        "nested": "error: nested/meta.json: nested too deeply (more than 8 levels of [ or {)",
    }
    for folder, line in expected.items():
        r = subprocess.run(
            [PV_RAY, "tune", "--config", str(TINY), "--images", folder, "--identity", "x", "--out", "adapter"],
            cwd=tmp_path,
            env={**os.environ, "COLUMNS": "400"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")
    assert not (tmp_path / "adapter").exists()


# --- the parts, one by one --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("[bold red]x.jpg", "\\[bold red]x.jpg"),
        ("[link=https://example.com]y[/link]", "\\[link=https://example.com]y\\[/link]"),
        ("a\x1b[31mb.jpg", "a\\x1b[31mb.jpg"),
        ("line\rover\nnext\t\x00\x7f\x9b", "line\\rover\\nnext\\t\\x00\\x7f\\x9b"),
        ("\u202egpj.exe", "\\u202egpj.exe"),  # a right-to-left override
        ("undecodable\udc80", "undecodable\\udc80"),
        ("alice é 😀 :smile:", "alice é 😀 :smile:"),
    ],
)
def test_terminal_safe_shows_user_text_literally(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


def test_terminal_safe_text_prints_as_written() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=io.StringIO(), width=200, emoji=False, color_system=None)
    table = Table("name")
    table.add_row(terminal_safe("[bold]x [/bold] :smile: a\x1b[31mb"))
    console.print(table)
    assert "[bold]x [/bold] :smile: a\\x1b[31mb" in console.file.getvalue()


def test_deeply_nested_meta_json_is_an_input_error_not_a_recursion_error() -> None:
    for data in (b"[" * 60_000, b"{" * 100, b'{"prompts": ' + b"[" * 20 + b"]" * 20 + b"}"):
        with pytest.raises(PromptFileError, match="nested too deeply"):
            IdentityMeta.parse(data)
    # brackets inside strings are text, not nesting
    assert IdentityMeta.parse(b'{"prompts": ["a {cls} [[[[[[[[[[[[ \\" [[[[[[["]}').prompts == [
        'a {cls} [[[[[[[[[[[[ " [[[[[[['
    ]
    with pytest.raises(PromptFileError, match="prompt 1: prompt has no {cls} placeholder"):
        IdentityMeta.parse(b'{"prompts": ["a person surfing"]}')
    with pytest.raises(PromptFileError, match="not valid JSON"):
        IdentityMeta.parse(b'{"class": ' + b"9" * 5000 + b"}")


def test_face_models_that_cannot_load_fail_each_identity_with_the_reason(tmp_path, model_cache):
    """An analysis actor whose face models do not load (a missing pack on a node) fails each
    identity it is given with the reason, instead of dying (Ray Data would restart it, failing the
    same way, and then fail the dataset and every identity with it)."""
    from pv_ray.batch.rows import row_outcome
    from pv_ray.cluster.ingest import AnalyzeIdentities
    from pv_ray.config import load_config

    cfg = load_config(TINY, [f"model.faces={tmp_path / 'no-face-pack'}"])
    analyse = AnalyzeIdentities(cfg.model_dump(mode="json"), None)
    write(tmp_path / "in", {"ana/photo.png": encoded(demo_photos()["astronaut"][0], "PNG")})
    outcome = row_outcome(analyse({"identity_id": "ana", "uri": str(tmp_path / "in" / "ana")}))
    assert outcome.status == "failed"
    assert outcome.reason.startswith("the face models could not be loaded ("), outcome.reason
    assert str(tmp_path / "no-face-pack") in outcome.reason

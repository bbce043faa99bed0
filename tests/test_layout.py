"""The layout holds what the README's "Layout" section says: only the Ray layer imports Ray, and
no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_LAYER = (ROOT / "pv_ray" / "cluster",)  # with serving/, the only code allowed to import Ray


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("path", python_files("pv_ray"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_ray_layer_imports_ray(path):
    if any(layer in path.parents for layer in RAY_LAYER):
        return
    ray_imports = [(line, module) for line, module, _ in imports(path) if module == "ray" or module.startswith("ray.")]
    assert not ray_imports, f"{path.relative_to(ROOT)} imports Ray outside pv_ray/cluster/: {ray_imports}"


@pytest.mark.parametrize(
    "path", python_files("pv_ray", "serving", "jobs", "tests"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_import_of_a_private_name(path):
    private = [
        (line, module, names)
        for line, module, names in imports(path)
        if module != "__future__"
        and (any(part.startswith("_") for part in module.split(".")) or any(n.startswith("_") for n in names))
    ]
    assert not private, f"{path.relative_to(ROOT)} imports private names: {private}"


def test_no_personal_data_is_tracked():
    """Nothing a run writes (stores, MLflow databases, adapters with face descriptors) is in git."""
    import subprocess

    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    run_outputs = [
        path
        for path in tracked
        if path.startswith((".pv-ray/", "out/", "mlruns/"))
        or path.endswith(("mlflow.db", "adapter.json", "report.json", "rejects.json"))
    ]
    assert not run_outputs, f"run outputs are tracked by git: {run_outputs[:10]}"

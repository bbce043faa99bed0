"""The layout holds what the README's "Layout" section says: the layers import downward only, the
import graph has no circle, only the Ray layer imports Ray, and no module imports another
module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_LAYER = ("cluster", "serving")  # the only code allowed to import Ray
# The layers, lowest first (README "Layout"): a module imports its own layer and those before it,
# never one after. `pv_ray/<name>.py` and `pv_ray/<name>/` are layer <name>; `serving/` is one layer.
LAYERS = (
    "__init__",  # pv_ray's version
    "errors",
    "terminal",
    "schedule",
    "storage",
    "config",
    "prompts",
    "model",
    "faces",
    "presets",
    "backbones",
    "evaluation",
    "method",
    "batch",
    "serving",
    "cluster",
    "cli",
    "__main__",
)


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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str) -> str | None:
    """The layer of a pv-ray module (None for any other module)."""
    parts = module.split(".")
    if parts[0] == "serving":
        return "serving"
    if parts[0] != "pv_ray":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def product_modules() -> dict[str, Path]:
    return {module_name(path): path for path in python_files("pv_ray", "serving")}


def test_only_the_ray_layer_imports_ray():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for name, path in product_modules().items()
        if layer_of(name) not in RAY_LAYER
        for line, module, _ in imports(path)
        if module == "ray" or module.startswith("ray.")
    ]
    assert not offenders, "Ray outside pv_ray/cluster/ and serving/:\n" + "\n".join(offenders)


def test_no_import_of_a_private_name():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} from {module} import {', '.join(names)}"
        for path in python_files("pv_ray", "serving", "jobs", "tests")
        for line, module, names in imports(path)
        if module != "__future__"
        and (any(part.startswith("_") for part in module.split(".")) or any(n.startswith("_") for n in names))
    ]
    assert not offenders, "imports of private names:\n" + "\n".join(offenders)


def test_imports_follow_the_layer_order():
    """Every import, at any depth (a deferred import is still an arrow), runs down the layers."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    undeclared, upward = set(), []
    for name, path in product_modules().items():
        source = layer_of(name)
        if source not in rank:
            undeclared.add(source)
            continue
        for line, module, _ in imports(path):
            target = layer_of(module)
            if target is None or target == source:
                continue
            if target not in rank:
                undeclared.add(target)
            elif rank[target] > rank[source]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {module} ({target})")
    assert not undeclared, f"layers missing from LAYERS (declare where they sit): {sorted(undeclared)}"
    assert not upward, "imports up the layer order:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    """No module reaches itself through imports (deferred ones included), within a layer too."""
    modules = product_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, module, names in imports(path):
            # `from pkg import mod` imports the module pkg.mod.
            graph[name] |= {t for t in [module, *(f"{module}.{n}" for n in names)] if t in modules and t != name}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def circle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := circle_from(target, [*path, target])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = circle_from(name, [name])
            assert circle is None, "import circle: " + " -> ".join(circle)


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

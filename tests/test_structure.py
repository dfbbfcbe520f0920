"""The layout that lets DVC rerun a stage whenever the code it runs changes: stages/ holds only the modules dvc.yaml
runs (and the policy stage's two algorithms), no stage imports another, and each stage's dvc.yaml deps list every
file of ours it runs (its module and every project module it imports, transitively, lazy imports included) and
every asset file it reads, nothing else of ours; its params list is the params subset its job key and manifest
record. And no test module imports another: what several share lives in tests/helpers.py and tests/projects.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from align import paths
from align.code import closure, imports, module_file
from tests.conftest import ROOT

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
ALGORITHMS = {"policy": ("ppo", "dpo")}  # the only stage that dispatches to other modules of stages/
ASSET_LITERAL = re.compile(r"""Path\(["'](assets/[^"']+)["']\)""")


def stage_module(stage: str) -> str:
    return PIPELINE[stage]["cmd"].split("python -m ", 1)[1].split()[0]


def assets_read(modules: set[str]) -> set[str]:
    """Asset files the modules name: `Path("assets/…")` literals, and align/paths.py's asset constants they use."""
    constants = {name: str(value) for name, value in vars(paths).items()
                 if isinstance(value, Path) and str(value).startswith("assets/")}
    found = set()
    for module in modules - {"align.paths"}:  # the constants count where they are used, not where defined
        text = module_file(module).read_text()  # type: ignore[union-attr]
        found |= set(ASSET_LITERAL.findall(text))
        tree = ast.parse(text)
        used = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "align.paths"
                for a in n.names}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "paths"}
        found |= {constants[name] for name in used if name in constants}
    return found


def runs(stage: str) -> set[str]:
    """The stage's module, its algorithms' modules, and all they import."""
    modules = {stage_module(stage), *(f"stages.{a}" for a in ALGORITHMS.get(stage, ()))}
    return set().union(*(closure(m) for m in modules))


def test_stages_holds_only_the_modules_dvc_yaml_runs() -> None:
    run = {stage_module(s) for s in PIPELINE} | {f"stages.{a}" for algos in ALGORITHMS.values() for a in algos}
    present = {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    assert present == run


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_no_stage_imports_another_stage(stage: str) -> None:
    allowed = {f"stages.{a}" for a in ALGORITHMS.get(stage, ())}
    for module in {stage_module(stage), *allowed}:
        others = {m for m in imports(module) if m.startswith("stages.")} - allowed
        assert not others, f"{module} imports {sorted(others)}: move what they share into align/"


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_deps_list_every_file_the_stage_runs_and_reads(stage: str) -> None:
    code = {str(module_file(m).relative_to(ROOT)) for m in runs(stage)}  # type: ignore[union-attr]
    wanted = code | assets_read(runs(stage))
    deps = set(PIPELINE[stage].get("deps", []))
    missing = sorted(wanted - deps)
    assert not missing, f"dvc.yaml: stages.{stage}.deps lacks {missing}"
    ours = {d for d in deps if d.endswith(".py") or d.startswith("assets/")}
    assert not sorted(ours - wanted), f"dvc.yaml: stages.{stage}.deps lists {sorted(ours - wanted)}, which it never runs"


def recorded_params(module: str) -> set[str]:
    """The keys of the dict a stage's main assigns to `subset` (its job key and manifest's params): a group, or
    group.key where the stage records single keys of a group."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):  # type: ignore[union-attr]
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["subset"] \
                and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if key is None and isinstance(value, ast.IfExp) and isinstance(value.body, ast.Dict):
                    keys |= {k.value for k in value.body.keys if isinstance(k, ast.Constant)}  # **({...} if x else {})
                elif isinstance(value, ast.Dict):
                    inner = [k for k in value.keys if k is not None]
                    splats = [v.body for k, v in zip(value.keys, value.values)  # **({...} if flag else {})
                              if k is None and isinstance(v, ast.IfExp) and isinstance(v.body, ast.Dict)]
                    inner += [k for splat in splats for k in splat.keys]
                    keys |= {f"{key.value}.{k.value}" for k in inner if isinstance(k, ast.Constant)}  # type: ignore[union-attr]
                else:
                    keys.add(key.value)  # type: ignore[union-attr]
    return keys


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_params_list_is_what_the_stage_records(stage: str) -> None:
    modules = [stage_module(stage), *(f"stages.{a}" for a in ALGORITHMS.get(stage, ()))]
    recorded = set().union(*(recorded_params(m) for m in modules))
    assert recorded, f"{modules}: no `subset = {{...}}` found"
    assert set(PIPELINE[stage].get("params", [])) == recorded


def imported_test_modules(path: Path) -> set[str]:
    """The tests/test_*.py modules the file at `path` imports, relative imports and lazy ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = f"tests.{node.module or ''}".rstrip(".") if node.level else node.module or ""
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("tests.test_") and (ROOT / f"{m.replace('.', '/')}.py").is_file()}


def test_no_test_module_imports_another() -> None:
    """Importing a test module runs its body and ties its edits to the importer's: shared helpers go into
    tests/helpers.py (running things) or tests/projects.py (project folders)."""
    found = {f"tests/{path.name}": sorted(imported_test_modules(path) - {f"tests.{path.stem}"})
             for path in sorted((ROOT / "tests").glob("test_*.py"))}
    assert not {name: others for name, others in found.items() if others}

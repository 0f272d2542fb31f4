"""The layering the code is reviewed against (docs/design.md §7), read from
every module's imports (ast, lazy imports inside functions included):
formats/ is the floor, models/ sits on it, a stage's modules other than its
cli.py never reach the CLI layer, stages import only earlier stages, and no
netp module imports itself back through others."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The order data flows in; pipeline (one pass) composes convert, quantize and shard.
STAGES = ("formats", "models", "convert", "quantize", "shard", "pipeline", "runtime")
CLI_LAYER = ("netp.cli", "netp.cliutil", "netp.inspect", "click", "tqdm")
FLOOR = ("netp.errors", "netp.hostenv", "netp.sizes", "netp.typenames")  # netp/ modules every layer may import
# Stage modules that still draw their own progress bar (none: each stage takes a
# progress callback and its cli.py owns the bar).
PENDING_PROGRESS: set[str] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["netp", *rel.parts] if rel.parts[0] != "netp" else list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [p for d in (*STAGES, "netp") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40, files  # the walk found the package
    return {_module_name(p): p for p in files}


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, resolved to a netp module where one is named."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            # `from netp.formats import atomic` imports the module netp.formats.atomic
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import (code imports netp.<package>...)")
    return out


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "netp" and parts[1] in STAGES else None


def _within(imported: str, prefixes: tuple[str, ...]) -> bool:
    return any(imported == p or imported.startswith(p + ".") for p in prefixes)


def test_bare_stage_imports_are_refused():
    bare = {m: sorted(i for i in imps if i.split(".")[0] in STAGES) for m, imps in IMPORTS.items()}
    assert not {m: i for m, i in bare.items() if i}, "import netp.<stage>, never a bare stage name"


@pytest.mark.parametrize("module", [m for m in MODULES if _stage(m) and not m.endswith(".cli")])
def test_stage_modules_stay_out_of_the_cli_layer(module):
    cli = [i for i in IMPORTS[module] if _within(i, CLI_LAYER)]
    if module in PENDING_PROGRESS:
        assert cli, f"{module} no longer imports the CLI layer: drop it from PENDING_PROGRESS"
        pytest.xfail("draws its own progress bar until the stage takes a progress callback")
    assert not cli, cli


def test_the_floor_imports_no_stage_and_no_cli():
    for module in FLOOR:
        assert not [i for i in IMPORTS[module] if _stage(i) or _within(i, CLI_LAYER)], module


def test_formats_is_the_floor():
    for module, imps in IMPORTS.items():
        if _stage(module) == "formats":
            netp = [i for i in imps if i.startswith("netp")]
            assert all(_within(i, ("netp.formats", *FLOOR)) for i in netp), (module, netp)


def test_models_import_only_formats_and_the_error_type():
    for module, imps in IMPORTS.items():
        if _stage(module) == "models":
            netp = [i for i in imps if i.startswith("netp")]
            assert all(_within(i, ("netp.models", "netp.formats", "netp.errors")) for i in netp), (module, netp)


def test_stages_import_only_earlier_stages():
    for module, imps in IMPORTS.items():
        stage = _stage(module)
        if stage is None:
            continue
        later = [i for i in imps if _stage(i) and STAGES.index(_stage(i)) > STAGES.index(stage)]
        assert not later, (module, later)


def test_runtime_does_not_import_the_shard_stage():
    # The runtime runs a shard set through netp.formats.shardset.ShardSet; the stage that
    # writes shard sets (netp.shard) is not among its dependencies.
    for module, imps in IMPORTS.items():
        if _stage(module) == "runtime":
            assert not [i for i in imps if _stage(i) == "shard"], module


def test_no_import_cycle():
    graph = {m: {i for i in imps if i in MODULES and i != m} for m, imps in IMPORTS.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_the_walk_sees_real_edges():
    # The checks above mean something only if the graph holds the imports known to exist.
    assert "netp.formats.shardset" in IMPORTS["netp.shard.check"]
    assert "netp.models.architecture" in IMPORTS["netp.models.mapping"]
    assert "click" in IMPORTS["netp.shard.cli"]


def test_comments_cite_only_the_repos_own_documents():
    outside = re.compile("DESIGN" + r"(\.md)? §|\.\./shared|/work/" + "shared")
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p != Path(__file__).resolve()]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, "cite docs/design.md, not a document outside the repo: " + ", ".join(hits)

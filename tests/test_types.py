"""The type check: mypy over every netp package ([tool.mypy] in pyproject.toml).

Among others it holds runtime.model.RankModel to models.context.RankContext,
so a field renamed on one side of the forwards' contract fails here.

The stage folders install as netp.<stage> (package-dir), which mypy cannot
follow through the editable install's import hook; so the check runs on a
tree of links laid out as the installed package (netp/formats -> formats/,
...) and reports paths in the repository's own layout.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("formats", "models", "convert", "quantize", "shard", "pipeline", "runtime")


def _link_tree(base: Path) -> Path:
    """base/netp/: links to netp/*.py and to each stage folder; made afresh each time
    (a file added or removed since the last run must show)."""
    pkg = base / "netp"
    if pkg.exists():
        for p in pkg.iterdir():
            p.unlink()
    pkg.mkdir(parents=True, exist_ok=True)
    for f in sorted((ROOT / "netp").glob("*.py")):
        (pkg / f.name).symlink_to(f)
    for stage in STAGES:
        (pkg / stage).symlink_to(ROOT / stage, target_is_directory=True)
    return base


def _repo_path(line: str) -> str:
    """netp/formats/ne.py:3: ... -> formats/ne.py:3: ..."""
    return re.sub(r"^netp/(" + "|".join(STAGES) + r")/", r"\1/", line)


def test_mypy_passes():
    pytest.importorskip("mypy", reason="mypy comes with the test extra: pip install -e '.[test]'")
    # build/ (gitignored) keeps the tree and mypy's cache at fixed paths, so a re-run is incremental.
    base = _link_tree(ROOT / "build" / "typecheck")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    p = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                        "--cache-dir", str(base / ".mypy_cache"), "--no-color-output", "--no-error-summary"],
                       cwd=base, env=env, capture_output=True, text=True, timeout=600)
    errors = [_repo_path(line) for line in p.stdout.splitlines() if line.strip()]
    assert p.returncode == 0 and not errors, "mypy:\n" + "\n".join(errors) + p.stderr

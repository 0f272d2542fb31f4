"""Reports CI systems read: the JSON of `verify --json` and `perplexity --json`, the
JUnit XML of `verify --junit` (docs/design.md §5, "Reports").

Rank 0 writes them, each atomically (formats.atomic.write_file), after the
paths were checked before any model ran (`check_report_paths`): a report is
never written over, into or in place of an input, and a refused path leaves
nothing written.
"""
from __future__ import annotations

import json
import math
import os
import platform
import stat
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from xml.etree import ElementTree

from netp.errors import NetpError
from netp.formats.atomic import write_file
from netp.formats.fileio import sha256_file
from netp.formats.paths import check_output_place
from netp.formats.shardset import ShardSet
from netp.formats.tokenizer_dir import tokenizer_dir_for
from netp.runtime.comparisons import Comparison, text_lines

REPORT_VERSION = 1


def model_inputs(*paths: str | os.PathLike | None) -> list[Path]:
    """The files and folders a run reads for these models: each path, and an NE file's
    tokenizer folder beside it (a shard set's is inside the set)."""
    out: list[Path] = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        out.append(p)
        if not p.is_dir():
            out.append(tokenizer_dir_for(p))
    return out


def check_report_paths(reports: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse report paths before anything runs: over an input, inside an input folder
    (a shard set), a folder, a special file, in a folder that does not exist, or two
    reports on one path. reports: option name -> path (None: not asked for)."""
    inputs = list(inputs)
    seen: dict[str, str] = {}
    for option, path in reports.items():
        if path is None:
            continue
        p = Path(path)
        check_output_place(p, inputs, f"{option} path")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise NetpError(p, f"cannot write the {option} report there ({e.strerror})") from e
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise NetpError(p, f"is {'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}; "
                               f"{option} takes a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise NetpError(p, f"its folder {parent} does not exist")
        key = os.path.realpath(p)
        if key in seen:
            raise NetpError(p, f"is given to both {seen[key]} and {option}")
        seen[key] = option


def environment(comm_kind: str, ranks: int, threads: int) -> dict[str, Any]:
    """What ran: versions (read from the installed metadata, nothing imported) and ranks x threads."""
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"netp": version("netp"), "numpy": version("numpy"), "transformers": version("transformers"),
            "python": platform.python_version(), "host": platform.node(), "world": comm_kind, "ranks": ranks,
            "threads": threads}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a non-finite figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | os.PathLike, doc: Mapping[str, Any]) -> Path:
    return write_file(path, (json.dumps(_finite(dict(doc)), indent=1, allow_nan=False) + "\n").encode("utf-8"))


def junit_xml(suite: str, cases: Sequence[Mapping[str, Any]], seconds: float, properties: Mapping[str, Any]) -> bytes:
    """JUnit XML: <testsuites><testsuite name tests failures errors skipped time><properties/>
    <testcase classname name time>[<failure message type>details</failure>]</testcase>...
    cases: {"classname", "name", "seconds", "failure" (the one-line reason, "" when passed), "details"}."""
    failures = sum(1 for c in cases if c["failure"])
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{seconds:.3f}"}
    root = ElementTree.Element("testsuites", {"name": suite, **counts})
    ts = ElementTree.SubElement(root, "testsuite", {"name": suite, **counts})
    props = ElementTree.SubElement(ts, "properties")
    for name, value in properties.items():
        ElementTree.SubElement(props, "property", {"name": name, "value": "" if value is None else str(value)})
    for c in cases:
        tc = ElementTree.SubElement(ts, "testcase", {"classname": c["classname"], "name": c["name"],
                                                     "time": f"{c['seconds']:.3f}"})
        if c["failure"]:
            failure = ElementTree.SubElement(tc, "failure", {"message": c["failure"], "type": "threshold"})
            failure.text = c.get("details", "")
        elif c.get("details"):
            ElementTree.SubElement(tc, "system-out").text = c["details"]
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


# -- verify's reports --------------------------------------------------------------------------

def comparison_json(c: Comparison) -> dict[str, Any]:
    """One comparison record as the report holds it."""
    return {"id": c.id, "title": c.title, "kind": c.kind, "passed": c.passed, "reason": c.reason,
            "figures": c.figures,
            "limits": [{"figure": lim.figure, "op": lim.op, "value": lim.value,
                        "passed": lim.holds(c.figures[lim.figure])} for lim in c.limits],
            "first_diverging_layer": c.first_diverging_layer, "seconds": c.seconds, "rows": c.rows}


def manifest_hashes(shards: ShardSet) -> dict[str, Any]:
    """The shard set's identity: its manifest's own sha256 and the sha256s it records."""
    m = shards.manifest
    return {"sha256": sha256_file(shards.manifest_path), "world_size": m.world_size,
            "source": {"name": m.source.name, "size": m.source.size, "sha256": m.source.sha256},
            "ranks": [{"file": r.file, "size": r.size, "sha256": r.sha256} for r in m.ranks],
            "tokenizer_files": [{"file": f.file, "size": f.size, "sha256": f.sha256} for f in m.tokenizer_files]}


def verify_junit(doc: Mapping[str, Any], comparisons: Sequence[Comparison], seconds: float) -> bytes:
    """One testcase per comparison; a failed one carries its one-line reason."""
    env = doc["environment"]
    cases = [{"classname": f"netp.verify.{c.kind}", "name": f"{c.id}: {c.title}", "seconds": c.seconds,
              "failure": c.reason, "details": "\n".join(text_lines(c)[-2 if c.first_diverging_layer else -1:])}
             for c in comparisons]
    props = {"target": doc["target"], "ref": doc["ref"], "f32": doc["f32"], "hf": doc["hf"],
             "manifest_sha256": (doc["manifest"] or {}).get("sha256"), "netp": env["netp"], "numpy": env["numpy"],
             "transformers": env["transformers"], "ranks": f"{env['ranks']} ({env['world']})",
             "threads": env["threads"]}
    return junit_xml(f"netp verify {doc['target']}", cases, seconds, props)

"""The report schema, read from its one place (docs/design.md §5, "Reports"), and
validation of real reports against it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def report_schema() -> dict[str, Any]:
    """The first ```json block under the heading "### Reports" of docs/design.md."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("\n### Reports\n", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block, "docs/design.md §5 Reports holds no ```json schema block"
    return json.loads(block.group(1))


def validate_report(path: Path) -> dict[str, Any]:
    """The report at `path`, parsed, after validating it against the schema (a failure raises)."""
    import jsonschema

    doc = json.loads(path.read_text(encoding="utf-8"))
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)
    return doc

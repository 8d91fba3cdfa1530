"""A suite's stored rows: the file names of an artifact directory and how its results file is read.

The runner writes them, the report reads them; both import this (the report never imports the runner).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

RESULTS = "results.jsonl"
META = "meta.json"


def warn(message: str) -> None:
    """One line on stderr, above a progress bar if one is drawn."""
    tqdm.write(message, file=sys.stderr)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file. A torn line (a run killed mid-write) is skipped with a warning naming it: its
    case counts as not run, so the next run runs it again."""
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("case"), dict) or "status" not in row:
            warn(f"warning: {path}:{i + 1}: skipped a torn result line (a run killed mid-write); its case runs again")
            continue
        rows.append(row)
    return rows

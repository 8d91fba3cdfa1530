"""Run a suite: one JSON line per finished case (so an interrupted run keeps its work and resumes),
`OOM` cells instead of crashes, then the table and plot from the rows.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longexposure import __version__
from longexposure.measure import is_oom
from longexposure.registry import TASKS
from longexposure.suite.config import Suite, case_fields, load_suite
from longexposure.suite.context import RunContext
from longexposure.suite.report import write_report

RESULTS = "results.jsonl"
META = "meta.json"


def _git_hash() -> str:
    """The commit the code came from; `LONGEXPOSURE_GIT` overrides (a copied tree has no .git)."""
    if os.environ.get("LONGEXPOSURE_GIT"):
        return os.environ["LONGEXPOSURE_GIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "longexposure": __version__}
    for name in ("triton", "transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def shared_dir() -> Path | None:
    """`LONGEXPOSURE_SHARED` or the `shared/` folder beside the repository, when it exists."""
    env = os.environ.get("LONGEXPOSURE_SHARED")
    candidates = (
        [Path(env)] if env else [Path(__file__).resolve().parents[2].parent / "shared", Path.cwd().parent / "shared"]
    )
    return next((p for p in candidates if p.is_dir()), None)


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True, default=str)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results file; a truncated last line (from a killed run) is dropped, anything else is an error."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: corrupt result line") from None
    return rows


def run_suite(
    suite_path: str | Path,
    preset: str = "auto",
    out: str | Path = "artifacts",
    force: bool = False,
    device: str | None = None,
    only: dict[str, str] | None = None,
) -> Path:
    """Run every pending case of `preset` (or those matching `only`: key -> value as text) and write
    the artifacts; returns the artifact directory."""
    suite: Suite = load_suite(suite_path)
    preset = suite.resolve_preset(preset)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out) / suite.name / preset
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS
    if force and results.exists():
        results.unlink()
    rows = read_rows(results)
    done = {_case_key(r["case"]) for r in rows if r.get("status") in ("ok", "OOM")}
    rows = [r for r in rows if r.get("status") in ("ok", "OOM")]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drop failed/truncated lines
    ctx = RunContext(device=dev, preset=preset, out_dir=out_dir, shared_dir=shared_dir())
    entry = TASKS.entry(suite.task)
    task, case_type = entry.obj, entry.meta["case"]
    cases = suite.cases(preset)
    if only:
        unknown = sorted(set(only) - {k for c in cases for k in c})
        if unknown:
            raise ValueError(f"--only: {suite.path} has no case key {unknown[0]!r}")
        cases = [c for c in cases if all(str(c.get(k)) == v for k, v in only.items())]
        if not cases:
            raise ValueError(f"--only {only}: no case of preset {preset!r} matches")
    pending = [c for c in cases if _case_key(c) not in done]
    meta = {
        "suite": suite.name,
        "paper": suite.paper,
        "suite_file": str(suite.path),
        "preset": preset,
        "task": suite.task,
        "device": device_name(dev),
        "versions": _versions(),
        "git": _git_hash(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": len(cases),
        "resumed_cases": len(cases) - len(pending),
        "command": " ".join(sys.argv),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    axes = suite.axes(preset)
    progress = tqdm(pending, desc=f"{suite.name}/{preset}", unit="case", disable=None)
    for case in progress:
        label = ", ".join(f"{a}={case[a]}" for a in axes)
        progress.set_postfix_str(label)
        started = time.perf_counter()
        row: dict[str, Any] = {"case": case, "device": meta["device"], "git": meta["git"]}
        try:
            result = task(case_type(**case_fields(case)), ctx)
            row["status"] = "ok"
            row["info"] = result.pop("info", {})
            row["metrics"] = result
        except Exception as exc:  # noqa: BLE001 - only OOM is turned into a cell; everything else re-raises
            if not is_oom(exc):
                raise RuntimeError(f"suite {suite.name} ({preset}): case {label or case} failed: {exc}") from exc
            row["status"] = "OOM"
            row["metrics"] = {}
            row["info"] = {"error": str(exc).splitlines()[0][:200]}
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row["elapsed_s"] = round(time.perf_counter() - started, 3)
        with results.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["run_info"] = ctx.info
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    write_report(suite, preset, out_dir)
    return out_dir

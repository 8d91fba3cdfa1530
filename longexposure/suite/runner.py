"""Run a suite: one JSON line per finished case (so an interrupted run keeps its work and resumes),
`OOM` cells instead of crashes, then the table and plot from the rows.

The results file is never lost nor doubled: one run at a time holds an output directory (an exclusive
`flock` on its lock file; a second run is refused), the file is only ever appended to or replaced whole
(written aside, then `os.replace`), and a torn line (a kill mid-write) is skipped with a warning and its
case runs again.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longexposure.distributed import is_main_process
from longexposure.measure import is_oom
from longexposure.paths import shared_dir, write_text_atomic
from longexposure.registry import TASKS
from longexposure.suite.config import Suite, case_fields, load_suite
from longexposure.suite.context import RunContext
from longexposure.suite.provenance import device_name, git_revision, versions
from longexposure.suite.report import write_report
from longexposure.suite.results import META, RESULTS, read_rows

LOCK = ".run.lock"
FINISHED = ("ok", "OOM")


class OutputInUse(ValueError):
    """Another run holds this output directory."""


def _case_key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True, default=str)


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for this run: an exclusive flock on its lock file (released when the process ends,
    however it ends); a second run into the same directory is refused instead of running every case again."""
    lock_path = out_dir / LOCK
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise OutputInUse(
                f"{out_dir} is in use by another run ({holder}): wait for it to finish, or pass another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}".replace("\n", " "))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_suite(
    suite_path: str | Path,
    preset: str = "auto",
    out: str | Path = "artifacts",
    force: bool = False,
    device: str | None = None,
    only: dict[str, str] | None = None,
    keep_going: bool = False,
) -> Path:
    """Run every pending case of `preset` (or those matching `only`: key -> value as text) and write
    the artifacts; returns the artifact directory. Every case is checked (names, options, local paths)
    before the first one runs. A failing case stops the run, or with `keep_going` becomes a `failed` row
    (its error recorded; rerun on the next start) and the run raises once every case has had its turn."""
    suite: Suite = load_suite(suite_path)
    preset = suite.resolve_preset(preset)
    suite.check_paths(preset)
    cases = suite.cases(preset)
    if only:
        unknown = sorted(set(only) - {k for c in cases for k in c})
        if unknown:
            raise ValueError(f"--only: {suite.path} has no case key {unknown[0]!r}")
        for key, values in only.items():  # a misspelt value among good ones is named, not silently dropped
            missing = sorted(set(values.split(",")) - {str(c.get(key)) for c in cases})
            if missing:
                known = sorted({str(c.get(key)) for c in cases})
                raise ValueError(
                    f"--only {key}={missing[0]}: no case of preset {preset!r} has it; its values: {', '.join(known)}"
                )
        cases = [c for c in cases if all(str(c.get(k)) in v.split(",") for k, v in only.items())]
        if not cases:
            raise ValueError(f"--only {only}: no case of preset {preset!r} matches")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out) / suite.name / preset
    out_dir.mkdir(parents=True, exist_ok=True)
    if not is_main_process():  # under torchrun: every rank trains every case, rank 0 alone writes
        return _run_cases(suite, preset, cases, out_dir, dev, force, keep_going, writer=False)
    with exclusive(out_dir):
        return _run_cases(suite, preset, cases, out_dir, dev, force, keep_going)


def _run_cases(
    suite: Suite,
    preset: str,
    cases: list[dict[str, Any]],
    out_dir: Path,
    dev: torch.device,
    force: bool,
    keep_going: bool = False,
    writer: bool = True,
) -> Path:
    results = out_dir / RESULTS
    if force and results.exists() and writer:
        results.unlink()
    kept = [] if force else [r for r in read_rows(results) if r.get("status") in FINISHED]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if writer and results.exists() and results.read_text() != text:
        write_text_atomic(results, text)  # drop failed and torn lines, so appends start on a clean line
    done = {_case_key(r["case"]) for r in kept}
    ctx = RunContext(device=dev, preset=preset, out_dir=out_dir, shared_dir=shared_dir())
    entry = TASKS.entry(suite.task)
    task, case_type = entry.obj, entry.meta["case"]
    pending = [c for c in cases if _case_key(c) not in done]
    meta = {
        "suite": suite.name,
        "paper": suite.paper,
        "suite_file": str(suite.path),
        "preset": preset,
        "task": suite.task,
        "device": device_name(dev),
        "versions": versions(),
        "git": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": len(cases),
        "resumed_cases": len(cases) - len(pending),
        "command": " ".join(sys.argv),
    }
    if writer:
        write_text_atomic(out_dir / META, json.dumps(meta, indent=2) + "\n")
    name = f"{suite.name}/{preset}"
    progress = tqdm(pending, desc=name, unit="case", disable=None if writer else True)
    log_lines = writer and not sys.stderr.isatty()  # no bar is drawn: one line per case, for logs and CI
    failed: list[str] = []
    for i, case in enumerate(progress, 1):
        label = suite.label(preset, case)
        progress.set_postfix_str(label)
        started = time.perf_counter()
        row: dict[str, Any] = {"case": case, "device": meta["device"], "git": meta["git"]}
        try:
            result = task(case_type(**case_fields(case)), ctx)
            row["status"] = "ok"
            row["info"] = result.pop("info", {})
            row["metrics"] = result
        except Exception as exc:  # noqa: BLE001 - OOM is a cell; other errors stop the run unless keep_going
            if not is_oom(exc) and not keep_going:
                raise RuntimeError(f"suite {suite.name} ({preset}): case {label} failed: {exc}") from exc
            row["status"] = "OOM" if is_oom(exc) else "failed"
            row["metrics"] = {}
            row["info"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            if row["status"] == "failed":
                failed.append(label)
                traceback.print_exc()
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row["elapsed_s"] = round(time.perf_counter() - started, 3)
        if not writer:
            continue
        with results.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if log_lines:
            print(f"{name} [{i}/{len(pending)}] {label}: {row['status']} in {row['elapsed_s']:.1f} s", file=sys.stderr)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["run_info"] = ctx.info
    if writer:
        write_text_atomic(out_dir / META, json.dumps(meta, indent=2) + "\n")
        write_report(suite, preset, out_dir)
    if failed:
        raise RuntimeError(
            f"suite {suite.name} ({preset}): {len(failed)} case(s) failed (kept going; the table marks them, "
            f"and the next run retries them): {'; '.join(failed)}"
        )
    return out_dir

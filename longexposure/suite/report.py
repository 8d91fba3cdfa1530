"""Tables and plots generated from a suite's result rows (never typed by hand).

The heading says what was measured (the setup every row shares, the device, what the preset is); the
paper's numbers follow under their own heading with the paper's setup, so a small CPU run is never read
as a claim about the paper's hardware.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from longexposure.suite.config import PRESETS, Suite, case_fields
from longexposure.suite.results import META, RESULTS, read_rows

# Setup keys named first in a heading (when the suite's cases have them), then the others.
SETUP_FIRST = ("model", "weights", "batch", "seq_len", "tokens", "precision", "dtype", "dataset")
# A row with this sparsity source keeps every block: sparsity cannot make it faster.
ALL_ACTIVE = "all-active"


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """The median of a metric (or the scalar itself); None if the row lacks it."""
    value = row.get("metrics", {}).get(metric)
    if isinstance(value, dict):
        return value.get("p50")
    return value


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def _with_share(value: float | None, total: float | None) -> str:
    if value is None or not total:
        return fmt(value)
    return f"{fmt(value)} ({100 * value / total:.1f}%)"


def _row_keys(suite: Suite, preset: str) -> list[str]:
    return suite.table.rows or suite.axes(preset) or []


def build_table(suite: Suite, preset: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the measured table: one line per case, its metrics, then speedup and relative
    columns. A speedup cell of a row that keeps every block (`all-active`) is marked: it cannot be a
    speedup from sparsity."""
    row_keys = _row_keys(suite, preset)
    metrics = suite.table.columns or suite.metrics
    share = suite.table.share_of
    header = [*row_keys, *metrics]
    speedup = suite.table.speedup_of
    speedup_vs = _bases(suite, preset, suite.table.speedup_vs)
    relative_vs = _bases(suite, preset, suite.table.relative_vs)
    header += [f"speedup vs {b}" for b in speedup_vs]
    header += [f"{suite.table.relative_of} / {b}" for b in relative_vs]
    match_keys = [k for k in row_keys if k != "variant"]
    by_case = {(r["case"].get("variant"), *(str(r["case"].get(k)) for k in match_keys)): r for r in rows}
    shared = _shared_metrics(suite, metrics)
    body = []
    for row in rows:
        case = row["case"]
        line = [str(case.get(k)) for k in row_keys]
        total = metric_value(row, share) if share else None
        for m in metrics:
            if row["status"] in ("OOM", "failed"):
                line.append(row["status"].replace("failed", "FAILED"))
            elif m in shared:
                line.append(_with_share(metric_value(row, m), total))
            else:
                line.append(fmt(metric_value(row, m)))
        mark = f" ({ALL_ACTIVE})" if all_active(row) else ""
        for base in speedup_vs:
            other = by_case.get((base, *(str(case.get(k)) for k in match_keys)))
            mine = metric_value(row, speedup) if row["status"] == "ok" else None
            theirs = metric_value(other, speedup) if other and other["status"] == "ok" else None
            line.append(f"{theirs / mine:.2f}x{mark}" if mine and theirs else "-")
        for base in relative_vs:
            other = by_case.get((base, *(str(case.get(k)) for k in match_keys)))
            mine = metric_value(row, suite.table.relative_of) if row["status"] == "ok" else None
            theirs = metric_value(other, suite.table.relative_of) if other and other["status"] == "ok" else None
            line.append(f"{mine / theirs:.3f}" if mine is not None and theirs else "-")
        body.append(line)
    return header, body


def _bases(suite: Suite, preset: str, bases: list[str]) -> list[str]:
    """The comparison variants this preset runs (a column against a variant it lacks would be empty)."""
    names = {v["name"] for v in suite.variants_of(preset)}
    return [b for b in bases if b in names] if names else list(bases)


def _shared_metrics(suite: Suite, metrics: list[str]) -> set[str]:
    """Metrics shown with their % of `share_of` (those in its unit, e.g. every `*_ms` of a total_ms)."""
    share = suite.table.share_of
    unit = share.rsplit("_", 1)[-1] if share else None
    return {m for m in metrics if share and m != share and m.rsplit("_", 1)[-1] == unit}


def all_active(row: dict[str, Any]) -> bool:
    return row.get("info", {}).get("sparsity_source") == ALL_ACTIVE


def build_paper_table(suite: Suite, preset: str) -> tuple[list[str], list[list[str]]]:
    """The paper's numbers as the suite records them: its case keys, then the metrics it reports."""
    refs = suite.paper_results
    metrics = [m for m in (suite.table.columns or suite.metrics) if any(m in ref for ref in refs)]
    keys = [k for k in _row_keys(suite, preset) if any(k in ref for ref in refs)]
    keys += [k for ref in refs for k in ref if k not in metrics and k not in keys and k not in suite.metrics]
    keys = list(dict.fromkeys(keys))
    share, shared = suite.table.share_of, _shared_metrics(suite, metrics)
    body = []
    for ref in refs:
        line = [str(ref.get(k, "")) for k in keys]
        for m in metrics:
            value = ref.get(m)
            line.append(_with_share(value, ref.get(share)) if m in shared and value is not None else fmt(value))
        body.append(line)
    return [*keys, *metrics], body


def measured_setup(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """('key value' of each setting every row shares, the keys that vary per row), from the rows themselves."""
    cases = [case_fields(r["case"]) for r in rows]
    keys = list(dict.fromkeys(k for c in cases for k in c))
    fixed, varying = [], []
    for key in sorted(keys, key=lambda k: SETUP_FIRST.index(k) if k in SETUP_FIRST else len(SETUP_FIRST)):
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in cases}
        if len(values) > 1:
            varying.append(key)
        elif not isinstance(cases[0].get(key), dict | list):
            fixed.append(f"{key} {cases[0].get(key)}")
    return fixed, varying


def _sources(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in rows:
        for key in ("weights", "data", "sparsity_source"):
            value = row.get("info", {}).get(key)
            if value is not None and str(value) not in out.setdefault(key, []):
                out[key].append(str(value))
    return out


def write_report(suite: Suite, preset: str, out_dir: Path) -> tuple[Path, Path | None]:
    """Write table.md (and table.png when the suite has a plot) from results.jsonl and meta.json."""
    rows = read_rows(out_dir / RESULTS)
    meta = json.loads((out_dir / META).read_text()) if (out_dir / META).exists() else {}
    device = meta.get("device", "?")
    header, body = build_table(suite, preset, rows)
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    fixed, varying = measured_setup(rows)
    lines = [f"# {suite.name}, preset `{preset}`: measured on {device}", ""]
    if rows:
        per_row = f"per row: {', '.join(varying)}" if varying else "one case"
        lines.append(f"- measured: {'; '.join([', '.join(fixed), per_row] if fixed else [per_row])}")
    lines += [
        f"- preset `{preset}`: {PRESETS.get(preset, '')}",
        f"- git: {meta.get('git', '?')}; versions: {versions}",
    ]
    for key, values in _sources(rows).items():
        lines.append(f"- {key.replace('_', ' ')}: {'; '.join(values)}")
    lines += [
        f"- cases: {len(rows)} ({sum(r['status'] == 'OOM' for r in rows)} OOM, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed: their errors are in results.jsonl); values are medians "
        "(p20/p80/min/max in results.jsonl)"
    ]
    if suite.notes:
        lines += ["", suite.notes.strip()]
    lines += ["", tabulate(body, headers=header, tablefmt="github"), ""]
    if _bases(suite, preset, suite.table.speedup_vs) and any(all_active(r) for r in rows):
        lines += [
            f"`({ALL_ACTIVE})`: that row keeps every block, so sparsity cannot make it faster; its ratio is the rest "
            "of its setup (e.g. the attention implementation) and run-to-run noise, not a speedup.",
            "",
        ]
    lines += [f"## The paper's numbers: {suite.paper}", ""]
    lines += [f"- the paper's setup: {suite.paper_setup or 'not recorded in the suite file'}", ""]
    if suite.paper_results:
        paper_header, paper_body = build_paper_table(suite, preset)
        lines += [tabulate(paper_body, headers=paper_header, tablefmt="github"), ""]
    else:
        lines += ["(no numbers recorded in the suite file)", ""]
    table_md = out_dir / "table.md"
    table_md.write_text("\n".join(lines))
    png = None
    if suite.plot is not None and rows:
        png = out_dir / "table.png"
        _plot(suite, preset, rows, png, device)
    return table_md, png


def _plot(suite: Suite, preset: str, rows: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = suite.plot
    assert spec is not None
    ys = spec.y or suite.metrics[:1]
    rows = [r for r in rows if r["status"] == "ok"]
    if spec.kind == "bar":
        label_keys = [k for k in (suite.table.rows or suite.axes(preset)) if k != spec.series]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
        labels = [" / ".join(str(r["case"].get(k)) for k in label_keys) for r in rows]
        bottom = [0.0] * len(rows)
        for metric in ys:  # several metrics stack (a breakdown); one metric is a plain bar
            values = [metric_value(r, metric) or 0.0 for r in rows]
            ax.bar(labels, values, bottom=bottom, label=metric)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel(", ".join(ys) if len(ys) == 1 else "ms")
        ax.tick_params(axis="x", labelrotation=45)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.legend()
        axes_list = [ax]
    elif spec.kind == "curve":
        fig, ax = plt.subplots(figsize=(7, 4))
        label_keys = [k for k in (suite.table.rows or suite.axes(preset))]
        for r in rows:
            values = r.get("metrics", {}).get(ys[0])
            if isinstance(values, list) and values:
                ax.plot(range(1, len(values) + 1), values, label=" ".join(str(r["case"].get(k)) for k in label_keys))
        ax.set_xlabel(spec.x or "step")
        ax.set_ylabel(ys[0])
        if spec.logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        axes_list = [ax]
    else:
        facets = sorted({str(r["case"].get(spec.facet)) for r in rows}) if spec.facet else [None]
        fig, grid = plt.subplots(len(ys), len(facets), figsize=(4.5 * len(facets), 3.5 * len(ys)), squeeze=False)
        axes_list = []
        for i, metric in enumerate(ys):
            for j, facet in enumerate(facets):
                ax = grid[i][j]
                sub = [r for r in rows if facet is None or str(r["case"].get(spec.facet)) == facet]
                series = sorted({str(r["case"].get(spec.series)) for r in sub}) if spec.series else [None]
                for s in series:
                    pts = sorted(
                        (r["case"][spec.x], metric_value(r, metric))
                        for r in sub
                        if (s is None or str(r["case"].get(spec.series)) == s) and metric_value(r, metric) is not None
                    )
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s or metric)
                ax.set_xlabel(spec.x)
                ax.set_ylabel(metric)
                if facet is not None:
                    ax.set_title(f"{spec.facet}={facet}", fontsize=9)
                if spec.logy:
                    ax.set_yscale("log")
                ax.legend(fontsize=7)
                axes_list.append(ax)
    fig.suptitle(f"{suite.name} ({preset}) on {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

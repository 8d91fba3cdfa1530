"""`longexposure` command line: list plug-ins, validate and run suites, regenerate reports, pretrain."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Subcommands implemented in their own modules: each exposes configure(parser) and main(args) -> int.
_MODULE_COMMANDS = {
    "pretrain": ("longexposure.pretrain", "pretrain a small ReLU OPT-architecture model on an offline corpus"),
    "finetune": ("longexposure.finetune", "fine-tune a model with a PEFT method (loss and ms/step as it goes)"),
    "train-predictors": ("longexposure.train_predictors", "train and save a model's sparsity predictors"),
}


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from longexposure.registry import ALL, registry

    kinds = [args.kind] if args.kind else list(ALL)
    for kind in kinds:
        reg = registry(kind)
        rows = [
            [
                e.name,
                e.meta.get("help", ""),
                ", ".join(f"{k}={v}" for k, v in e.meta.items() if k not in ("help", "case")),
            ]
            for e in reg
        ]
        print(f"\n{kind} ({len(rows)})")
        print(tabulate(rows, headers=["name", "description", "capabilities"]) if rows else "  (none registered)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from longexposure.suite.config import load_suite

    for path in args.suites:
        suite = load_suite(path)
        counts = ", ".join(f"{p}: {len(suite.cases(p))} cases" for p in suite.presets)
        print(f"{path}: ok ({suite.name}, task {suite.task}; {counts})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from longexposure.suite.runner import run_suite

    only = {}
    for pair in args.only:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--only expects key=value, got {pair!r}")
        only[key] = value
    out_dir = run_suite(args.suite, preset=args.preset, out=args.out, force=args.force, device=args.device, only=only)
    print((out_dir / "table.md").read_text())
    print(f"artifacts: {out_dir}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from longexposure.suite.config import load_suite
    from longexposure.suite.report import write_report

    suite = load_suite(args.suite)
    preset = suite.resolve_preset(args.preset)
    out_dir = Path(args.out) / suite.name / preset
    if not (out_dir / "results.jsonl").exists():
        raise FileNotFoundError(f"no results at {out_dir / 'results.jsonl'}: run the suite first")
    table, png = write_report(suite, preset, out_dir)
    print(table.read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longexposure",
        description="Long Exposure: sparse PEFT acceleration and its reproduction suite.",
        epilog="Example: longexposure run suites/table1.yaml --preset cpu-tiny",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered plug-ins (all kinds, or one KIND)")
    p.add_argument("kind", nargs="?", help="model_preset, peft_method, dataset, attention_backend, mlp_backend, ...")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("validate", help="check suite files without running them")
    p.add_argument("suites", nargs="+", help="suite YAML files")
    p.set_defaults(func=_cmd_validate)

    for name, func, helptext in (
        ("run", _cmd_run, "run a suite (resumes unless --force)"),
        ("report", _cmd_report, "rewrite table.md/table.png from saved results"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("suite", help="suite YAML file, e.g. suites/table1.yaml")
        p.add_argument("--preset", default="auto", help="cpu-tiny, paper, or auto (paper on a GPU, else cpu-tiny)")
        p.add_argument("--out", default="artifacts", help="artifact root (default: artifacts)")
        if name == "run":
            p.add_argument("--force", action="store_true", help="discard earlier results of this preset")
            p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
            p.add_argument(
                "--only",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="run only the cases with this value (repeatable), e.g. --only seq_len=1024",
            )
        p.set_defaults(func=func)

    for name, (module, helptext) in _MODULE_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        p = sub.add_parser(name, help=helptext)
        mod.configure(p)
        p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        print(f"longexposure {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

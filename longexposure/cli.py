"""`longexposure` command line: list plug-ins, validate and run suites, regenerate reports, pretrain.

Errors: a user's mistake (a bad flag value, a missing file, an unknown name, a backend or device this machine
lacks, a suite case failing from one of those) is one line on stderr and exit code 2; anything else is a bug
and keeps its traceback. Start-up: this module imports no torch; `--help`, and the options of the commands
implemented in other modules, are defined without it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Collection
from pathlib import Path

from longexposure.registry import RegistryError

# Subcommands implemented in their own modules: each exposes configure(parser) and main(args) -> int. A module is
# imported only for the command that runs, so `longexposure --help`, `list` and `validate` never import it.
_MODULE_COMMANDS = {
    "pretrain": ("longexposure.pretrain", "pretrain a small ReLU OPT-architecture model on an offline corpus"),
    "finetune": ("longexposure.finetune", "fine-tune a model with a PEFT method (loss and ms/step as it goes)"),
    "train-predictors": ("longexposure.train_predictors", "train and save a model's sparsity predictors"),
    "evaluate": ("longexposure.evaluate", "accuracy of a (fine-tuned) model on local data with lm-evaluation-harness"),
}


class UserError(Exception):
    """What the user asked for cannot be done here (e.g. `--device cuda` on a CPU-only torch): one line, exit 2."""


# The user's mistakes, as opposed to bugs. LookupError is not among them (a KeyError is a bug); RegistryError is.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    RegistryError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,
)
# Raised by modules that import torch: looked up only if the module was loaded (if not, it raised nothing).
_LAZY_USER_ERRORS = (
    ("longexposure.backends", "BackendUnavailable"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types = list(_USER_ERRORS)
    for module, name in _LAZY_USER_ERRORS:
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            types.append(found)
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    """`exc`, or an exception it was raised `from`, is a user error. A failing suite case is re-raised as a
    RuntimeError from its cause: the user's when the cause is (a missing file, an unavailable backend), a bug's
    when it is not."""
    types = _user_error_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_device(device: str | None) -> None:
    """A `--device` this torch or machine cannot use is refused before any work starts, saying why."""
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise UserError(
            f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; "
            "install a CUDA build of torch, or pass --device cpu"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: no CUDA device is visible (torch {torch.__version__}); pass --device cpu")
    if dev.index is not None and dev.index >= count:
        raise UserError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off, empty) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action) or text


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
                ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in e.meta.items() if k not in ("help", "case")),
            ]
            for e in reg
        ]
        print(f"\n{kind} ({len(rows)})")
        print(tabulate(rows, headers=["name", "description", "capabilities"]) if rows else "  (none registered)")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from longexposure.suite.config import load_suite

    for path in args.suites:
        suite = load_suite(path)  # names and nested options of every case, against registries and configs
        for preset in suite.presets:
            suite.check_paths(preset)  # the local files they name exist here
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
    out_dir = run_suite(
        args.suite,
        preset=args.preset,
        out=args.out,
        force=args.force,
        device=args.device,
        only=only,
        keep_going=args.keep_going,
    )
    from longexposure.distributed import is_main_process

    if is_main_process():  # under torchrun only rank 0 wrote the table
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


def build_parser(configure: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    Args:
        configure: the module commands (`pretrain`, `finetune`, `train-predictors`) whose options are defined,
            which imports their modules; None: all. `main` passes only the command it runs, so neither
            `longexposure --help` nor `list` imports them (pretrain's module imports torch).
    """
    parser = argparse.ArgumentParser(
        prog="longexposure",
        description="Long Exposure: sparse PEFT acceleration and its reproduction suite.",
        epilog="Example: longexposure run suites/table1.yaml --preset cpu-tiny",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)

    p = add("list", "list registered plug-ins (all kinds, or one KIND)")
    p.add_argument("kind", nargs="?", help="model_preset, peft_method, dataset, attention_backend, mlp_backend, ...")
    p.set_defaults(func=_cmd_list)

    p = add("validate", "check suite files without running them")
    p.add_argument("suites", nargs="+", help="suite YAML files")
    p.set_defaults(func=_cmd_validate)

    for name, func, helptext in (
        ("run", _cmd_run, "run a suite (resumes unless --force)"),
        ("report", _cmd_report, "rewrite table.md/table.png from saved results"),
    ):
        p = add(name, helptext)
        p.add_argument("suite", help="suite YAML file, e.g. suites/table1.yaml")
        p.add_argument(
            "--preset",
            default="auto",
            help="cpu-tiny, paper, cpu-quality (where a suite has it), or auto (paper on a GPU, else cpu-tiny)",
        )
        p.add_argument("--out", default="artifacts", help="artifact root (default: artifacts)")
        if name == "run":
            p.add_argument("--force", action="store_true", help="discard earlier results of this preset")
            p.add_argument(
                "--keep-going",
                action="store_true",
                help="a failing case becomes a FAILED cell and the other cases still run (exit code 2 at the end)",
            )
            p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
            p.add_argument(
                "--only",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="run only the cases with this value, or any of comma-separated values (repeatable), "
                "e.g. --only seq_len=1024 --only variant=peft-sdpa,long-exposure",
            )
        p.set_defaults(func=func)

    for name, (module, helptext) in _MODULE_COMMANDS.items():
        if configure is not None and name not in configure:
            if importlib.util.find_spec(module) is not None:
                add(name, helptext)  # listed in --help; its options are defined when it is the command
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        p = add(name, helptext)
        mod.configure(p)
        p.set_defaults(func=mod.main)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in `argv`: its first positional (the top-level parser has no other options)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    args = build_parser(configure=[command] if command in _MODULE_COMMANDS else []).parse_args(argv)
    try:
        check_device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"longexposure {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`longexposure evaluate`: accuracy of a (fine-tuned) model with lm-evaluation-harness, on local data only.

A base model (a preset with `--weights`, or a checkpoint directory as `--model`) and optionally the adapter
`longexposure finetune --out DIR` saved (DIR or DIR/adapter; merged into the weights, so the evaluated model is
the dense fine-tuned model whatever sparsity trained it) are wrapped in lm-eval's `HFLM` and run through
`lm_eval.simple_evaluate`. Tasks are lm-eval YAML files: the ones shipped in `longexposure/eval_tasks`
(`e2e_nlg`, `e2e_ppl`, `mc_json`), a user's own (`--include-path DIR`), or lm-eval's built-in ones (e.g.
`piqa`, `winogrande`, `copa`, `hellaswag`, `rte`). Nothing is fetched: every task's data is a local JSON/JSONL
(`--data TASK=PATH`), which replaces the task's dataset (`dataset_path: json`, `data_files`) through a
per-run YAML that `include:`s the task's own file; a task whose YAML already reads local files runs as it is,
and a task that would read the hub without a `--data` is refused. The E2E tasks read the project's E2E file
(token ids) and evaluate on its held-out meaning representations only (`longexposure.eval_data`).

lm-eval (`pip install longexposure[eval]`) is imported only when an evaluation runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

E2E_TASKS = ("e2e_nlg", "e2e_ppl")
SHIPPED_TASKS = (*E2E_TASKS, "mc_json")
EVAL_MODULES = {"lm_eval": "lm-eval", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}
LOCAL_DATASETS = ("json", "csv", "parquet", "text", "arrow")  # `datasets` builders that read local files


def require_eval_dependencies() -> None:
    """One line naming the extra when lm-eval or a metric library is missing (a user error, exit 2)."""
    from longexposure.cli import UserError

    missing = [pkg for module, pkg in EVAL_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"evaluation needs {', '.join(missing)} (not installed): pip install longexposure[eval]")


@dataclass
class EvalConfig:
    """What to evaluate on, and how.

    Attributes:
        tasks: task names (shipped, from `include_path`, or lm-eval's built-in ones).
        data: task -> local JSON/JSONL; the E2E tasks default to the shared directory's data/e2e.
        include_path: directories of the user's own task YAMLs.
        limit: at most this many documents per task (None: all).
        batch_size: sequences per forward of lm-eval's HFLM.
        max_gen_toks: generation length of generate_until tasks (None: the task's own, 64 for e2e_nlg).
        e2e_split: `held-out` (the token-id file the model trains on: only its held-out MRs) or `all` (a file
            that is all evaluation data).
        num_fewshot: in-context examples (0: none, as after fine-tuning).
    """

    tasks: list[str] = field(default_factory=lambda: list(E2E_TASKS))
    data: dict[str, str] = field(default_factory=dict)
    include_path: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    max_gen_toks: int | None = None
    e2e_split: str = "held-out"
    num_fewshot: int = 0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no evaluation task given")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.num_fewshot < 0:
            raise ValueError(f"need batch_size >= 1 and num_fewshot >= 0, got {self.batch_size}, {self.num_fewshot}")
        unused = sorted(set(self.data) - set(self.tasks))
        if unused:
            raise ValueError(f"--data names {unused[0]!r}, which is not among the tasks {self.tasks}")


def adapter_dir(path: str | Path) -> Path:
    """The peft adapter directory in `path` (what `finetune --out DIR` saved: DIR/adapter), or `path` itself."""
    p = Path(path).expanduser()
    for candidate in (p / "adapter", p):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if (p / "trainable.safetensors").is_file():
        raise ValueError(
            f"{p} holds trainable.safetensors (a method peft does not implement); evaluate loads peft adapters "
            "(lora, adapter, p-tuning runs save DIR/adapter)"
        )
    raise FileNotFoundError(f"no peft adapter at {p} (expected {p / 'adapter'}/adapter_config.json, as finetune saves)")


def load_model(
    model: str, weights: str | None, adapter: str | None, device: torch.device, attn: str = "sdpa", seed: int = 0
) -> tuple[torch.nn.Module, str]:
    """The model to evaluate, in eval mode, and a line naming what it is. An adapter is merged into the weights."""
    from longexposure.models import build_model
    from longexposure.registry import MODEL_PRESETS

    base = build_model(model, weights=weights, attn_implementation=attn, device=device, seed=seed)
    what = model + (
        f" with weights {weights}" if weights else f" (random init, seed {seed})" if model in MODEL_PRESETS else ""
    )
    if adapter is not None:
        from peft import PeftModel

        path = adapter_dir(adapter)
        base = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        what += f", adapter {path} (merged)"
    return base.eval(), what


def load_tokenizer(tokenizer: str | None, model: str, weights: str | None) -> Any:
    """`tokenizer`, else the one saved with the checkpoint, else the project's OPT tokenizer."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        for place in (weights, model):
            if place and (Path(place) / "tokenizer_config.json").is_file():
                tokenizer = place
                break
    if tokenizer is None:
        from longexposure.paths import default_tokenizer

        tokenizer = str(default_tokenizer())
    if not Path(tokenizer).expanduser().exists():
        raise FileNotFoundError(f"tokenizer {tokenizer} does not exist (pass --tokenizer DIR)")
    return AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()))


class _Lenient(yaml.SafeLoader):
    """Reads task YAML without running its `!function` tags (only the dataset keys are needed here)."""


_Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)


def _raw_yaml(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=_Lenient) or {}
    include = data.get("include")
    if isinstance(include, str):  # the keys it inherits, under its own
        data = {**_raw_yaml((path.parent / include).resolve()), **data}
    return data


def _index(paths: list[str], builtins: bool) -> dict[str, Path]:
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_path=paths or None, include_defaults=builtins).task_index
    return {name: Path(e.yaml_path) for name, e in index.items() if getattr(e, "yaml_path", None)}


@functools.cache
def _builtin_task_files() -> dict[str, Path]:
    """lm-eval's own tasks (thousands of YAMLs: indexed once per process, only when a task is not ours)."""
    return _index([], builtins=True)


def _task_files(include_path: list[str]) -> dict[str, Path]:
    """Task name -> its YAML, from the shipped tasks and the user's directories (which win over ours)."""
    from longexposure.eval_tasks import TASK_DIR

    for d in include_path:
        if not Path(d).expanduser().is_dir():
            raise FileNotFoundError(f"--include-path {d} is not a directory")
    return _index([str(TASK_DIR), *(str(Path(d).expanduser()) for d in include_path)], builtins=False)


def _local_file(path: str, task: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--data {task}={path}: no such file")
    return p.resolve()


def _e2e_file(config: EvalConfig, task: str, family: str | None) -> Path:
    """The E2E file of an e2e task: --data, else the shared directory's data/e2e (as the e2e dataset reads)."""
    from longexposure.data.builtin import _require_file

    path = config.data.get(task)
    if path is None:
        from longexposure.paths import shared_dir

        root = shared_dir()
        path = str(root / "data" / "e2e") if root is not None and (root / "data" / "e2e").is_dir() else None
    hint = f"pass --data {task}=PATH (the E2E release's valid_opt.jsonl, or a text file of mr/ref rows)"
    if path is None:
        raise FileNotFoundError(f"task {task}: no E2E data found in the shared directory; {hint}")
    return _require_file(path, "e2e", hint, family).resolve()


def prepare_tasks(
    config: EvalConfig, tokenizer: Any, workdir: Path, family: str | None = "opt"
) -> tuple[Path, dict[str, str]]:
    """One YAML per task under `workdir/tasks` that includes the task's own file and points it at local data;
    returns that directory and, per task, a line naming its data. `family` picks the E2E file of a directory
    holding one tokenization per family (valid_opt.jsonl, valid_gpt.jsonl)."""
    from longexposure.eval_data import e2e_groups, write_nlg_rows, write_ppl_rows

    files = _task_files(config.include_path)
    if any(t not in files for t in config.tasks):
        files = {**_builtin_task_files(), **files}
    unknown = [t for t in config.tasks if t not in files]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(files), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown evaluation task {unknown[0]!r}.{hint} Shipped: {', '.join(SHIPPED_TASKS)}; add your own "
            "task YAMLs with --include-path DIR, or name one of lm-eval's tasks (`lm-eval ls tasks`)"
        )
    task_dir = workdir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    e2e_cache: dict[Path, tuple[list, str]] = {}
    for task in config.tasks:
        raw = _raw_yaml(files[task])
        wrapper: dict[str, Any] = {"include": str(files[task]), "task": task}
        if task in E2E_TASKS:
            source = _e2e_file(config, task, family)
            if source not in e2e_cache:
                e2e_cache[source] = e2e_groups(source, tokenizer, config.e2e_split)
            groups, notes[task] = e2e_cache[source]
            rows = workdir / "data" / f"{task}.jsonl"
            if task == "e2e_nlg":
                write_nlg_rows(groups, rows)
            else:
                write_ppl_rows(groups, tokenizer, rows)
            data: Path | None = rows
        elif task in config.data:
            data = _local_file(config.data[task], task)
            notes[task] = f"{task}: {data}"
        else:
            data = None
            local = raw.get("dataset_path") in LOCAL_DATASETS and (raw.get("dataset_kwargs") or {}).get("data_files")
            if not local:
                raise ValueError(
                    f"task {task} reads dataset {raw.get('dataset_path')!r} (from the hub: evaluate fetches nothing); "
                    f"pass a local copy with --data {task}=PATH"
                )
            notes[task] = f"{task}: its own data_files ({files[task]})"
        if data is not None:
            wrapper |= {
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "validation_split": None,
                "training_split": None,
                "fewshot_split": None,
            }
        if config.max_gen_toks is not None and raw.get("output_type") == "generate_until":
            wrapper["generation_kwargs"] = {**(raw.get("generation_kwargs") or {}), "max_gen_toks": config.max_gen_toks}
        (task_dir / f"{task}.yaml").write_text(yaml.safe_dump(wrapper, sort_keys=False))
    return task_dir, notes


def flatten_results(results: dict[str, Any], tasks: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """`{task}_{metric}` -> value (and -> stderr) from lm-eval's results, e.g. e2e_nlg_bleu, piqa_acc."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for task in tasks:
        for key, value in results["results"].get(task, {}).items():
            name, _, _filter = key.partition(",")
            if not isinstance(value, int | float) or isinstance(value, bool) or name in ("alias", "sample_len"):
                continue
            if name.endswith("_stderr"):
                stderr[f"{task}_{name.removesuffix('_stderr')}"] = float(value)
            else:
                metrics[f"{task}_{name}"] = float(value)
    return metrics, stderr


def evaluate_model(
    model: torch.nn.Module, tokenizer: Any, config: EvalConfig, workdir: Path, seed: int = 0
) -> dict[str, Any]:
    """Run `config.tasks` on `model` with lm-eval; returns {metrics, stderr, n_docs, data, config}."""
    require_eval_dependencies()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from longexposure.models import family_of

    try:
        family: str | None = family_of(model)
    except ValueError:  # any causal LM evaluates; the family only picks an E2E file out of a directory
        family = None
    task_dir, notes = prepare_tasks(config, tokenizer, workdir, family)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=config.batch_size,
        max_length=int(getattr(model.config, "max_position_embeddings", 2048)),
        device=str(next(model.parameters()).device),
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=TaskManager(include_path=[str(task_dir)], include_defaults=False),
        log_samples=False,
        bootstrap_iters=1000,  # acc: closed-form stderr; our corpus metrics: none (lm-eval bootstraps only its own)
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # simple_evaluate returns None on the non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    metrics, stderr = flatten_results(results, config.tasks)
    n_docs = {t: int(v.get("effective", v.get("original", 0))) for t, v in results.get("n-samples", {}).items()}
    return {"metrics": metrics, "stderr": stderr, "n_docs": n_docs, "data": notes, "config": asdict(config)}


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects TASK=PATH, got {pair!r}")
        out[key] = value
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    """The `evaluate` options; needs neither torch nor lm-eval, so `longexposure evaluate --help` is quick."""
    parser.epilog = (
        "Your own checkpoint: --model DIR (a Hugging Face causal-LM directory; its tokenizer is used when it has "
        "one), or --model PRESET --weights DIR. A fine-tuned adapter: --adapter DIR from `longexposure finetune "
        "--out DIR`. Your own tasks: --include-path DIR of lm-eval task YAMLs (dataset_path: json, data_files: "
        "local files), then --task NAME; any task's data can be replaced by a local JSON/JSONL with --data "
        "NAME=PATH (e.g. --task piqa --data piqa=piqa_valid.jsonl runs lm-eval's own piqa task on that file). "
        "Example: longexposure evaluate --model relu-micro --weights ~/.cache/longexposure/relu-micro "
        "--adapter runs/lora --task e2e_nlg --task e2e_ppl --limit 50"
    )
    parser.add_argument("--model", default="opt-tiny", help="preset name, or a local checkpoint directory")
    parser.add_argument(
        "--weights", default=None, help="checkpoint loaded into a preset's architecture (`pretrained`: the project's)"
    )
    parser.add_argument("--adapter", default=None, help="peft adapter: a `finetune --out` directory or its adapter/")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's, else shared/opt-tokenizer)"
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        help=f"task name, repeatable (default: {' and '.join(E2E_TASKS)}); shipped: {', '.join(SHIPPED_TASKS)}",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="local JSON/JSONL of a task, repeatable. E2E tasks: the release's token-id file (only its held-out "
        "meaning representations are evaluated; default: the shared directory's data/e2e) or text rows {mr, ref}; "
        "mc_json: rows {query, choices, gold}",
    )
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR", help="your own task YAMLs")
    parser.add_argument(
        "--e2e-split",
        default="held-out",
        choices=("held-out", "all"),
        help="E2E token-id file: evaluate its held-out MRs (the file is also the training file) or all of them",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="tokens generated per E2E prompt (default 64)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="in-context examples per prompt")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of lm-eval's sampling and a preset's random init")
    parser.add_argument("--out", default=None, help="directory for eval.json and the per-run task files")


def main(args: argparse.Namespace) -> int:
    require_eval_dependencies()
    import tempfile

    import torch

    config = EvalConfig(
        tasks=args.task or list(E2E_TASKS),
        data=_pairs(args.data, "--data"),
        include_path=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        e2e_split=args.e2e_split,
        num_fewshot=args.num_fewshot,
    )
    weights = args.weights
    if weights == "pretrained":
        from longexposure.prepared import pretrained_weights

        weights = str(pretrained_weights(args.model, None))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.tokenizer, args.model, weights)
    model, what = load_model(args.model, weights, args.adapter, device, args.attn, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="longexposure-eval-") as tmp:
        workdir = Path(args.out) if args.out else Path(tmp)
        result = evaluate_model(model, tokenizer, config, workdir, seed=args.seed)
    result["model"] = what
    for name, value in result["metrics"].items():
        err = result["stderr"].get(name)
        print(f"{name}: {value:.4f}" + (f" (stderr {err:.4f})" if err is not None else ""))
    print(f"model: {what}")
    for note in result["data"].values():
        print(f"data: {note}")
    if args.out:
        (Path(args.out) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {Path(args.out) / 'eval.json'}", file=sys.stderr)
    return 0

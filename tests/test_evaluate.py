"""`longexposure evaluate`: lm-eval on local data, the E2E held-out rows, metrics, adapters, errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longexposure.cli import main
from longexposure.eval_tasks import metrics

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "opt-tokenizer"
DATA = Path(__file__).resolve().parent / "data"
needs_e2e = pytest.mark.skipif(not (E2E.is_dir() and TOKENIZER.is_dir()), reason=f"E2E data not found at {E2E}")


def _eval(tmp_path: Path, *argv: str, name: str = "eval") -> dict:
    out = tmp_path / name
    code = main(["evaluate", "--device", "cpu", "--tokenizer", str(TOKENIZER), "--out", str(out), *argv])
    assert code == 0
    return json.loads((out / "eval.json").read_text())


def test_identical_prediction_and_reference_score_bleu_100_and_rouge_l_1():
    refs = ["The Vaults is a pub near the river .", "There is a cheap pub called The Vaults ."]
    other = ["Alimentum serves Italian food in the city centre .", "Italian food is served at Alimentum ."]
    # the prediction matches one reference of its MR (any of them: references are grouped per MR)
    same = [(refs, refs[1]), (other, other[0])]
    assert metrics.corpus_bleu(same) == pytest.approx(100.0)
    assert metrics.mean_rouge_l(same) == pytest.approx(1.0)
    swapped = [(refs, other[0]), (other, refs[1])]
    assert metrics.corpus_bleu(swapped) < 20.0
    assert metrics.mean_rouge_l(swapped) < 0.5
    # an MR with fewer references than another still scores (the missing ones are skipped, not empty strings)
    assert metrics.corpus_bleu([(refs, refs[0]), (other[:1], other[0])]) == pytest.approx(100.0)
    # per-token perplexity: every token at probability 1/2 -> 2, whatever the split into documents
    assert metrics.token_perplexity([(3 * math.log(0.5), 3), (5 * math.log(0.5), 5)]) == pytest.approx(2.0)


@needs_e2e
def test_e2e_rows_are_the_held_out_meaning_representations_only():
    from transformers import AutoTokenizer

    from longexposure.data.builtin import e2e_split
    from longexposure.eval_data import e2e_groups

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    file = E2E / "valid_opt.jsonl"
    groups, description = e2e_groups(file, tok)
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    pairs = [(r["context"], r["completion"]) for r in rows]
    held = {tuple(c) for c, _ in e2e_split(pairs, "held-out")}
    trained = {tuple(c) for c, _ in e2e_split(pairs, "train")}
    prompts = {tuple(tok(g.prompt, add_special_tokens=False)["input_ids"]) for g in groups}
    assert prompts == held and not prompts & trained  # the exact ids the model saw as contexts, held out only
    assert sum(len(g.references) for g in groups) == len(e2e_split(pairs, "held-out"))
    assert "held-out" in description


def test_e2e_text_rows_are_grouped_per_meaning_representation(tmp_path):
    from transformers import AutoTokenizer

    from longexposure.eval_data import e2e_groups, write_ppl_rows

    if not TOKENIZER.is_dir():
        pytest.skip(f"no tokenizer at {TOKENIZER}")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    file = tmp_path / "dev.jsonl"
    mrs = ["name[A], food[Thai]", "name[B], area[riverside]"]
    lines = [{"mr": mrs[0], "ref": "A serves Thai food."}, {"mr": mrs[1], "ref": "B is by the river."},
             {"mr": mrs[0], "ref": "Thai food is served at A."}]  # fmt: skip
    file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    groups, _ = e2e_groups(file, tok)
    assert [(g.mr, len(g.references)) for g in groups] == [(mrs[0], 2), (mrs[1], 1)]
    ppl = [json.loads(x) for x in write_ppl_rows(groups, tok, tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert len(ppl) == 3 and all(r["target_tokens"] == len(tok(r["target"], add_special_tokens=False)["input_ids"])
                                 for r in ppl)  # fmt: skip


@needs_e2e
def test_evaluate_runs_a_tiny_model_end_to_end(tmp_path):
    from longexposure.data.builtin import e2e_split

    result = _eval(tmp_path, "--model", "opt-tiny", "--limit", "3", "--max-gen-toks", "6", "--batch-size", "3")
    m = result["metrics"]
    assert 0.0 <= m["e2e_nlg_bleu"] <= 100.0 and 0.0 <= m["e2e_nlg_rouge_l"] <= 1.0
    # a random-init model spreads its probability over the vocabulary: perplexity near its size, far above 1
    assert 10.0 < m["e2e_ppl_perplexity"] < 10 * 50272
    assert result["n_docs"] == {"e2e_nlg": 3, "e2e_ppl": 3}
    assert "held-out" in result["data"]["e2e_nlg"]
    written = [json.loads(x) for x in (tmp_path / "eval" / "data" / "e2e_nlg.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (E2E / "valid_opt.jsonl").read_text().splitlines()]
    held = e2e_split([(r["context"], r["completion"]) for r in rows], "held-out")
    assert len(written) == len({tuple(c) for c, _ in held})  # every held-out MR once, its references together
    assert sum(len(r["references"]) for r in written) == len(held)


@needs_e2e
def test_an_adapter_saved_by_finetune_round_trips_into_evaluate(tmp_path):
    from peft import PeftModel

    from longexposure.evaluate import load_model
    from longexposure.models import build_model

    run = tmp_path / "lora"
    code = main(["finetune", "--model", "opt-tiny", "--method", "lora", "--dataset", "e2e", "--data-path", str(E2E),
                 "--data-split", "train", "--steps", "4", "--seq-len", "32", "--batch", "2", "--lr", "1e-2",
                 "--precision", "fp32", "--device", "cpu", "--out", str(run)])  # fmt: skip
    assert code == 0 and (run / "adapter" / "adapter_config.json").is_file()
    merged, what = load_model("opt-tiny", None, str(run), torch.device("cpu"))
    assert "adapter" in what
    reference = PeftModel.from_pretrained(build_model("opt-tiny"), str(run / "adapter")).eval()
    base = build_model("opt-tiny").eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref, raw = merged(input_ids=ids).logits, reference(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # the trained adapter, merged exactly
    assert (out - raw).abs().max() > 1e-3  # and it changed the model
    tuned = _eval(tmp_path, "--model", "opt-tiny", "--adapter", str(run), "--task", "e2e_ppl", "--limit", "4",
                  name="tuned")  # fmt: skip
    plain = _eval(tmp_path, "--model", "opt-tiny", "--task", "e2e_ppl", "--limit", "4", name="plain")
    assert tuned["metrics"]["e2e_ppl_perplexity"] != pytest.approx(plain["metrics"]["e2e_ppl_perplexity"], rel=1e-3)


def test_multiple_choice_format_scores_every_document_against_its_gold(tmp_path):
    rows = [json.loads(x) for x in (DATA / "mc_sample.jsonl").read_text().splitlines()]
    n_choices = len(rows[0]["choices"])
    assert all(len(r["choices"]) == n_choices for r in rows)
    accs = []
    for k in range(n_choices):  # the same documents with the gold moved to choice k
        file = tmp_path / f"gold{k}.jsonl"
        file.write_text("".join(json.dumps({**r, "gold": k}) + "\n" for r in rows))
        result = _eval(tmp_path, "--model", "opt-tiny", "--task", "mc_json", "--data", f"mc_json={file}",
                       name=f"gold{k}")  # fmt: skip
        assert result["n_docs"] == {"mc_json": len(rows)}
        accs.append(result["metrics"]["mc_json_acc"])
    # each document's argmax is one choice: right under exactly one of the golds, whatever the model
    assert sum(accs) == pytest.approx(1.0)
    p, n = accs[-1], len(rows)  # lm-eval's stderr of a mean of 0/1 scores: sample std / sqrt(n)
    assert result["stderr"]["mc_json_acc"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_lm_eval_builtin_task_runs_on_a_local_copy(tmp_path):
    result = _eval(tmp_path, "--model", "opt-tiny", "--task", "piqa", "--data", f"piqa={DATA / 'piqa_sample.jsonl'}")
    assert result["n_docs"] == {"piqa": 4}
    assert result["metrics"]["piqa_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_clear_errors_for_a_missing_data_file_and_an_unknown_task(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["evaluate", "--device", "cpu", "--task", "mc_json", "--data", f"mc_json={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "no such file" in err
    assert main(["evaluate", "--device", "cpu", "--task", "e2e_nlgg"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown evaluation task 'e2e_nlgg'" in err and "Did you mean 'e2e_nlg'" in err and "--include-path" in err
    assert main(["evaluate", "--device", "cpu", "--task", "mc_json", "--data", "mc_json"]) == 2
    assert "TASK=PATH" in capsys.readouterr().err


def test_a_hub_task_without_local_data_is_refused(tmp_path, capsys):
    assert main(["evaluate", "--device", "cpu", "--task", "piqa"]) == 2
    err = capsys.readouterr().err
    assert "fetches nothing" in err and "--data piqa=PATH" in err


def test_without_lm_eval_evaluate_names_the_extra_and_nothing_else_needs_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what find_spec and import see when it is not installed
    assert main(["evaluate", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install longexposure[eval]" in err and "lm-eval" in err
    code = "import sys, longexposure, longexposure.evaluate, longexposure.cli; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    help_text = subprocess.run(
        [sys.executable, "-m", "longexposure", "evaluate", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "--include-path" in help_text and "--adapter" in help_text and "checkpoint" in help_text


@needs_e2e
def test_suite_task_fine_tunes_each_variant_then_evaluates_it_dense(tmp_path, monkeypatch):
    from longexposure.suite.context import RunContext
    from longexposure.tasks.evaluate import EvaluateCase, evaluate

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path)
    live = {"source": "predicted", "predictors": "auto", "mlp_block": 32, "attn_block": 16,
            "mlp_backend": "torch-gather", "attention_backend": "eager"}  # fmt: skip
    base = dict(model="opt-tiny", method="lora", batch=2, seq_len=64, precision="fp32", attn="eager", lr=1e-2,
                dataset="e2e", data_path=str(E2E), data_split="train", predictor_batches=2, predictor_steps=3,
                eval_tasks=["e2e_ppl"], eval_limit=3)  # fmt: skip
    untouched = evaluate(EvaluateCase(**base, steps=0), ctx)
    exposed = evaluate(EvaluateCase(**base, steps=3, exposure=live), ctx)
    assert "final_loss" not in untouched and math.isfinite(exposed["final_loss"])
    assert exposed["info"]["sparsity_source"].startswith("predicted")
    assert "adapter" in exposed["info"]["evaluated_model"] and "dense" in exposed["info"]["evaluated_model"]
    assert "held-out" in exposed["info"]["eval_data"] and exposed["info"]["eval_docs"] == "e2e_ppl 3"
    # the adapter trained under the predicted sparsity is what was evaluated: it moved the held-out perplexity
    assert exposed["e2e_ppl_perplexity"] != pytest.approx(untouched["e2e_ppl_perplexity"], rel=1e-3)
    with pytest.raises(ValueError, match="data_split: train"):
        EvaluateCase(**{**base, "data_split": None}, steps=3)


def test_a_users_own_task_file_runs_from_include_path(tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_choice.yaml").write_text(
        "task: my_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {DATA / 'mc_sample.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{query}}\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n"
    )
    result = _eval(tmp_path, "--model", "opt-tiny", "--include-path", str(tasks), "--task", "my_choice")
    assert result["n_docs"] == {"my_choice": 6} and 0.0 <= result["metrics"]["my_choice_acc"] <= 1.0
    assert "its own data_files" in result["data"]["my_choice"]

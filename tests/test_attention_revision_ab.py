"""`benchmarks/attention_revision_ab.py` loads another revision of the attention kernels beside the installed one:
the copy must be a module of its own (its own kernels and constants) that computes what the installed one does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from longexposure.kernels import block_sparse_attention as installed

from longexposure.attention.layout import BlockLayout

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_revision_ab.py"
_spec = importlib.util.spec_from_file_location("attention_revision_ab", _PATH)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def test_a_loaded_revision_is_its_own_module_and_agrees_with_the_installed_one():
    mods = ab.revisions([installed.__file__], ["L2_SHARE=6"])
    assert list(mods) == ["old", "new", "L2_SHARE=6"]
    assert mods["old"] is not installed and mods["old"]._bsa_fwd_kernel is not installed._bsa_fwd_kernel
    assert mods["L2_SHARE=6"].L2_SHARE == 6 and installed.L2_SHARE != 6
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(4))
    lay = BlockLayout.from_dense(torch.ones(4, 4, dtype=torch.bool).tril(), 16)
    kw = {"block": 16, "causal": True, "scale": 0.25}
    outs = {name: [t for f in ab.calls(m, q, k, v, do, lay, kw) for t in f()] for name, m in mods.items()}
    for name in ("new", "L2_SHARE=6"):
        for got, want in zip(outs[name], outs["old"], strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("setting", ["NOPE=1", "L2_SHARE="])
def test_bad_settings_and_missing_files_are_named(tmp_path, setting):
    with pytest.raises(SystemExit, match="--set"):
        ab.revisions([installed.__file__], [setting])
    with pytest.raises(SystemExit, match="no file at"):
        ab.revisions([str(tmp_path / "missing.py")], [])


def test_further_files_are_columns_named_by_their_stems(tmp_path):
    extra = tmp_path / "variant_a.py"
    extra.write_text(Path(installed.__file__).read_text())
    mods = ab.revisions([installed.__file__, str(extra)], [])
    assert list(mods) == ["old", "new", "variant_a"]
    assert mods["variant_a"]._bsa_fwd_kernel is not mods["old"]._bsa_fwd_kernel
    with pytest.raises(SystemExit, match="distinct names"):
        ab.revisions([installed.__file__, str(extra), str(extra)], [])


def test_a_held_config_is_released_and_picks_are_read_as_text():
    from longexposure.measure import autotuner_held_to

    tuner = installed._bsa_fwd_kernel
    before = list(tuner.configs)
    with autotuner_held_to(tuner, before[-1:]):
        assert tuner.configs == before[-1:]
    assert tuner.configs == before and not tuner.cache
    got = ab.picks(installed)
    assert set(got) == set(ab.TUNERS) and all(isinstance(v, dict) for v in got.values())


def test_a_graft_swaps_one_kernel_part_and_names_bad_parts(tmp_path):
    # a donor whose dQ and dK/dV parts each carry a marker: the graft takes the dQ part only
    source = Path(installed.__file__).read_text()
    donor_text = source
    for part, (start, _) in ab.GRAFTS.items():
        donor_text = donor_text.replace(start, f"{start}\n    # donor's {part} part", 1)
    donor = tmp_path / "donor.py"
    donor.write_text(donor_text)
    name, path = ab.grafted(f"donor_dq={donor}:dq", tmp_path)
    text = Path(path).read_text()
    assert name == "donor_dq" and "# donor's dq part" in text and "# donor's dkdv part" not in text
    assert len(text) == len(source) + len("\n    # donor's dq part")
    mods = ab.revisions([installed.__file__, path], [])
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(4))
    lay = BlockLayout.from_dense(torch.ones(4, 4, dtype=torch.bool).tril(), 16)
    kw = {"block": 16, "causal": True, "scale": 0.25}
    outs = {n: [t for f in ab.calls(m, q, k, v, do, lay, kw) for t in f()] for n, m in mods.items()}
    for got, want in zip(outs["donor_dq"], outs["new"], strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(SystemExit, match="unknown part 'fwd'"):
        ab.grafted(f"x={donor}:fwd", tmp_path)
    with pytest.raises(SystemExit, match="NAME=FILE:PART"):
        ab.grafted("x=", tmp_path)


def test_forced_times_each_config_of_one_kernel_and_releases_its_autotuner():
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(4))
    lay = BlockLayout.from_dense(torch.ones(4, 4, dtype=torch.bool).tril(), 16)
    fwd, bwd = ab.calls(installed, q, k, v, do, lay, {"block": 16, "causal": True, "scale": 0.25})
    for tuner, fn in ((installed._bsa_fwd_kernel, fwd), (installed._bsa_bwd_dq_kernel, bwd)):
        before = list(tuner.configs)
        timed = []
        got = ab.forced(tuner, fn, lambda f, seen=timed, t=tuner: seen.append(list(t.configs)) or 1.5)
        assert got == {str(cfg): 1.5 for cfg in before}
        assert timed == [[cfg] for cfg in before]  # each timing ran with the tuner held to one config
        assert tuner.configs == before

"""Provenance: every result names its device, commit and versions from one helper."""

import torch

from longexposure.suite.provenance import device_name, git_revision, provenance, versions


def test_git_override_wins(monkeypatch):
    monkeypatch.setenv("LONGEXPOSURE_GIT", "abc1234")
    assert git_revision() == "abc1234"
    assert provenance("cpu")["git"] == "abc1234"


def test_git_from_checkout(monkeypatch):
    monkeypatch.delenv("LONGEXPOSURE_GIT", raising=False)
    rev = git_revision()
    assert rev == "unknown" or len(rev.removesuffix("-dirty")) >= 7


def test_header_is_flat_and_complete():
    head = provenance(torch.device("cpu"))
    assert head["device"].startswith("CPU (") and "cores" in head["device"]
    assert head["torch"] == torch.__version__
    for key in ("python", "longexposure", "triton", "transformers", "peft", "started"):
        assert isinstance(head[key], str) and head[key]
    assert set(versions()) <= set(head)


def test_device_name_accepts_strings():
    assert device_name("cpu") == device_name(torch.device("cpu"))

"""RunOwner: the one place a run directory is created, its config written, another run refused
and its status written (the harness and attach(out=...) both use it)."""

import pytest

from capscale.rundir import RunDir, RunStatus
from capscale.runowner import RunOwner, diff_keys


def test_begin_creates_the_run_and_a_different_run_is_refused_naming_the_keys(tmp_path):
    owner = RunOwner(tmp_path / "r", what="config", advice="use another --out")
    owner.refuse_other_run({"a": 1}, dict)  # nothing there yet: nothing to refuse
    owner.begin({"a": 1, "b": {"c": 2}}, step=3)
    run = RunDir(tmp_path / "r")
    assert run.read_config() == {"a": 1, "b": {"c": 2}} and run.checkpoint_dir.is_dir()
    assert run.read_status() == {"status": "running", "step": 3, "reason": None}
    owner.refuse_other_run({"a": 1, "b": {"c": 2}}, dict)  # the same run
    with pytest.raises(ValueError, match=r"different config \(differs in \['b.c'\]\); use another --out$"):
        owner.refuse_other_run({"a": 1, "b": {"c": 5}}, dict, name_keys=True)
    # identity decides: a field it leaves out may differ
    owner.refuse_other_run({"a": 1, "b": {"c": 5}}, lambda c: c["a"])
    owner.set_status(RunStatus.FAILED, 7, "boom")
    assert run.read_status() == {"status": "failed", "step": 7, "reason": "boom"}


def test_begin_without_a_step_leaves_status_alone_and_diff_keys_is_sorted_and_dotted(tmp_path):
    RunOwner(tmp_path / "r", what="config", advice="x").begin({"a": 1})
    assert RunDir(tmp_path / "r").read_status() is None
    assert diff_keys({"z": 1, "a": {"b": 1, "c": 2}}, {"a": {"b": 2, "c": 2}, "y": 0}) == ["a.b", "y", "z"]

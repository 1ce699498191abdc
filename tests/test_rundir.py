"""The run-directory contract: one reading rule per file, the run lock, temp files, the spectra dataset."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from capscale.rundir import (
    SPECTRA_FILE,
    RunDir,
    RunDirError,
    RunLockedError,
    RunStatus,
    spectra_parts,
)


def test_importing_the_contract_does_not_import_torch():
    code = "import sys, capscale.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- metrics.jsonl ---------------------------------------------------------------


def _records(n):
    return [{"step": 10 * (i + 1), "loss": 5.0 - i} for i in range(n)]


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    run = RunDir(tmp_path)
    run.append_metrics(_records(3))
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 40, "lo')  # a kill in the middle of an append
    with caplog.at_level(logging.WARNING, logger="capscale.rundir"):
        assert run.read_metrics() == _records(3)
    assert str(run.metrics_path) in caplog.text and "torn last line 4" in caplog.text
    run.truncate_metrics(20)
    assert run.metrics_path.read_text().splitlines() == [json.dumps(r) for r in _records(2)]


def test_a_damaged_middle_line_is_refused_and_resume_truncation_leaves_the_file_as_it_was(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics(_records(15))
    lines = run.metrics_path.read_text().splitlines(keepends=True)
    lines[9] = '{"step": 100, "loss": \x00garbage\n'
    run.metrics_path.write_text("".join(lines))
    before = run.metrics_path.read_bytes()
    with pytest.raises(RunDirError, match=rf"{run.metrics_path} line 10 is damaged"):
        run.read_metrics()
    with pytest.raises(RunDirError, match="line 10"):
        run.truncate_metrics(150)  # the old rule kept lines 1-9 and deleted steps 100-150 for good
    assert run.metrics_path.read_bytes() == before


def test_a_line_that_is_json_but_no_object_is_damage(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(RunDirError, match="line 2"):
        run.read_metrics()


def test_truncation_keeps_lines_byte_for_byte_and_ends_the_file_with_a_newline(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_path.write_text('{"step": 1, "loss": 1.0000000000000002}\n{"step":  2}')  # complete, no final \n
    run.truncate_metrics(5)
    assert run.metrics_path.read_text() == '{"step": 1, "loss": 1.0000000000000002}\n{"step":  2}\n'
    run.append_metrics([{"step": 3}])
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]


# -- config.json / status.json ---------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("[1, 2]", "must hold a JSON object, not list"),
        ("{not json", "is not valid JSON"),
        ('{"status": "finished", "step": 3}', "'status' must be one of"),
        ('{"status": "running", "step": -2}', "'step' must be a non-negative integer"),
    ],
)
def test_a_malformed_status_is_one_line_naming_the_file(tmp_path, text, match):
    run = RunDir(tmp_path)
    run.status_path.write_text(text)
    with pytest.raises(RunDirError, match=match) as exc:
        run.read_status()
    assert str(run.status_path) in str(exc.value) and "\n" not in str(exc.value)


def test_a_config_that_is_not_json_names_the_file(tmp_path):
    run = RunDir(tmp_path)
    run.config_path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(RunDirError, match=rf"{run.config_path} is not UTF-8"):
        run.read_config()
    run.config_path.write_text("model = 1")
    with pytest.raises(RunDirError, match=rf"{run.config_path} is not valid JSON"):
        run.read_config()


def test_run_status_is_one_enum():
    assert RunStatus("done") == "done" and str(RunStatus.DIVERGED) == "diverged"
    assert [s.value for s in RunStatus if s.finished] == ["done", "diverged"]


# -- the run lock ----------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from capscale.rundir import RunDir
    with RunDir(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(120)
    """
)


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    proc = _holder(run.path)
    try:
        assert run.lock_holder()["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on {socket.gethostname()}"):
            with run.lock(wait=0):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the flock
        proc.wait()
    assert run.lock_holder() is None
    with run.lock(wait=0):
        assert run.lock_holder()["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with RunDir(tmp_path).lock(wait=0):  # a sweep worker holds it around train, which takes it too
            pass
        assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    assert not run.lock_path.exists()  # released: the lock file it made is gone
    run.lock_path.write_text("")  # a lock file someone else made stays, without a stale record
    with run.lock(wait=0):
        pass
    assert run.lock_path.read_text() == ""
    with run.lock(wait=0):
        pass


def test_a_lock_on_a_new_directory_leaves_no_trace_if_nothing_was_written(tmp_path):
    run = RunDir(tmp_path / "new")
    with pytest.raises(ValueError, match="bad input"):
        with run.lock():
            raise ValueError("bad input")
    assert not run.path.exists()
    with run.lock():
        run.write_status(RunStatus.RUNNING, 0)
    assert sorted(p.name for p in run.path.iterdir()) == ["status.json"]


def test_orphaned_temp_files_are_removed_when_the_lock_is_taken(tmp_path):
    run = RunDir(tmp_path)
    run.create()
    run.append_spectra(_frame(0))
    orphans = [
        run.checkpoint_dir / ".step_00000010.pt.123.abcd1234.tmp",
        run.path / ".status.json.123.abcd1234.tmp",
        run.spectra_path / ".part-00000001-00000005-00000005.parquet.123.ab12cd34.tmp",
    ]
    keep = [run.checkpoint_dir / "step_00000010.pt", run.path / "notes.tmp"]
    for p in orphans + keep:
        p.write_bytes(b"x" * 10)
    with run.lock():
        pass
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)


# -- spectra.parquet: a dataset of parts -------------------------------------------


def _frame(step, rows=4, d=6):
    return pd.DataFrame(
        {
            "step": [step] * rows,
            "layer": list(range(rows)),
            "site": ["post"] * rows,
            "soft_rank": np.linspace(1.0, 2.0, rows) + step,
            "eigenvalues": [np.geomspace(1.0, 1e-3, d) for _ in range(rows)],
        }
    )


def test_spectra_are_one_part_per_window_read_whole_by_pandas(tmp_path):
    run = RunDir(tmp_path)
    for step in (5, 10, 15):
        run.append_spectra(_frame(step))
    assert [(a, b) for a, b, _ in spectra_parts(run.spectra_path)] == [(5, 5), (10, 10), (15, 15)]
    whole = pd.read_parquet(run.spectra_path)
    assert list(whole["step"]) == [5] * 4 + [10] * 4 + [15] * 4
    pd.testing.assert_frame_equal(whole, run.read_spectra())
    assert list(run.read_spectra(columns=["step", "layer"]).columns) == ["step", "layer"]
    np.testing.assert_allclose(whole["eigenvalues"].iloc[-1], np.geomspace(1.0, 1e-3, 6))


def test_truncation_drops_later_parts_and_rewrites_at_most_one(tmp_path):
    run = RunDir(tmp_path)
    for step in (5, 10):
        run.append_spectra(_frame(step))
    run.append_spectra(pd.concat([_frame(15), _frame(20)], ignore_index=True))  # one part straddling
    run.append_spectra(_frame(25))
    first = spectra_parts(run.spectra_path)[0][2]
    stat = first.stat()
    run.truncate_spectra(17)
    assert [(a, b) for a, b, _ in spectra_parts(run.spectra_path)] == [(5, 5), (10, 10), (15, 15)]
    assert first.stat().st_mtime_ns == stat.st_mtime_ns and first.stat().st_ino == stat.st_ino  # untouched
    assert sorted(set(pd.read_parquet(run.spectra_path)["step"])) == [5, 10, 15]
    run.append_spectra(_frame(20))  # the resumed run records the window again, after the others
    assert list(pd.read_parquet(run.spectra_path)["step"].unique()) == [5, 10, 15, 20]


def test_an_old_single_file_is_read_and_becomes_a_dataset_when_appended_to(tmp_path):
    run = RunDir(tmp_path)
    old = pd.concat([_frame(5), _frame(10)], ignore_index=True)
    old.to_parquet(run.spectra_path, index=False)
    pd.testing.assert_frame_equal(run.read_spectra(), old)
    run.append_spectra(_frame(15))
    assert run.spectra_path.is_dir() and not (tmp_path / ".spectra.parquet.single").exists()
    assert list(pd.read_parquet(run.spectra_path)["step"].unique()) == [5, 10, 15]

    other = RunDir(tmp_path / "b")
    other.create()
    old.to_parquet(other.spectra_path, index=False)
    other.truncate_spectra(5)
    assert list(other.read_spectra()["step"].unique()) == [5]


def test_the_probe_sink_holds_no_rows_between_writes(tmp_path):
    from capscale.probe import ParquetSink

    sink = ParquetSink(tmp_path / SPECTRA_FILE)
    for step in range(3):
        sink.write_spectra(_frame(step))
    assert not any(isinstance(v, (pd.DataFrame,)) or type(v).__name__ == "Table" for v in vars(sink).values())
    assert len(pq.ParquetDataset(tmp_path / SPECTRA_FILE).read()) == 12


def test_parts_with_different_columns_read_as_one_frame(tmp_path):
    run = RunDir(tmp_path)
    run.append_spectra(_frame(5).drop(columns=["soft_rank"]))  # an older writer without that column
    run.append_spectra(_frame(10))
    df = run.read_spectra(columns=["step", "soft_rank"])
    assert list(df["step"]) == [5] * 4 + [10] * 4
    assert df["soft_rank"].iloc[:4].isna().all() and df["soft_rank"].iloc[4:].notna().all()


def test_a_deleted_lock_file_lets_no_second_writer_in(tmp_path):
    # issue 30, item 5: the holder's flock was on the deleted inode; the directory's own lock stays
    run = RunDir(tmp_path / "run")
    proc = _holder(run.path)
    try:
        run.lock_path.unlink()
        with pytest.raises(RunLockedError, match="being trained by another process"):
            with run.lock(wait=0):
                pass
        assert run.lock_holder() == {}  # held, by a holder whose record was deleted
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run.lock_holder() is None
    with run.lock(wait=0):
        pass


def test_a_non_reentrant_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    run = RunDir(tmp_path)
    with run.lock(reentrant=False):
        with pytest.raises(RunLockedError, match=f"already being written by this process \\(pid {os.getpid()}\\)"):
            with RunDir(tmp_path).lock(reentrant=False):
                pass
    with run.lock(reentrant=False):  # released: free again
        pass

"""benchmarks/gpu_study.sh: the study it runs on a GPU, and an end-to-end run at toy size on the CPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

torch = pytest.importorskip("torch")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_study", BENCH / "gpu_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_study_is_the_depth_study_model_at_x1_to_x16_and_10_tokens_per_parameter():
    from capscale.sweep.spec import CPU_DEPTH_LR, SweepSpec
    from capscale.train.model import GPT

    runs = SweepSpec.from_dict(_module().study_spec(toy=False)).runs().values()
    assert len(runs) == 5 * 2 * 2
    assert {c.model_config().ffn_dim for c in runs} == {64, 128, 256, 512, 1024}
    assert {(c.label, c.optimizer.params["lr"]) for c in runs} == set(CPU_DEPTH_LR.items())
    assert {c.train.seed for c in runs} == {0, 1}
    shape = {(c.model_config().n_layer, c.model_config().d_model, c.model_config().seq_len) for c in runs}
    assert shape == {(6, 64, 128)}
    x4 = next(c for c in runs if c.model_config().ffn_dim == 256)
    params = GPT(x4.with_vocab(1024).model).num_params(non_embedding=True)
    assert {c.train.steps for c in runs} == {x4.train.steps}  # the same tokens at every width
    assert 10 <= x4.train.steps * x4.train.batch_size * x4.model_config().seq_len / params < 10.01
    for c in runs:  # N/D >= 10 in a bucket holding 30% of the window's tokens, at every width
        tel = c.telemetry
        assert tel.window * c.train.batch_size * c.model_config().seq_len * 0.30 >= 10 * c.model_config().ffn_dim
        assert c.train.steps % tel.every == 0


def test_gpu_study_toy_mode_runs_the_study_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(BENCH / "gpu_study.sh"), "--toy", "--out", str(tmp_path / "study")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 of 6 runs finished" in out.stdout
    assert "Δβ_hard muon − adamw" in out.stdout and "adamw: β hard" in out.stdout
    assert out.stdout.rstrip().endswith("gpu_study: ok")

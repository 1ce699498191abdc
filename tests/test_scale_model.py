"""scripts/scale_model.py: the figures of docs/scale.md against hand arithmetic."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scale_model.py"
spec = importlib.util.spec_from_file_location("scale_model", SCRIPT)
sm = importlib.util.module_from_spec(spec)
sys.modules["scale_model"] = sm  # its dataclasses look their module up
spec.loader.exec_module(sm)
SHAPES = {s.name: s for s in sm.SHAPES}


def test_state_bytes_by_hand():
    # Llama-3 8B: 14,336² float64 = 1,644,167,168 bytes; 70B: 28,672² · 8 = 6,576,668,672.
    assert sm.state_bytes(14336) == 14336 * 14336 * 8 == 1_644_167_168
    assert sm.replicated_bytes(SHAPES["llama3-70b"], 1, False) == 80 * 6_576_668_672
    # paper-160m: 12 layers × pre/post × 3 bucket states of 3,072² doubles = 5.44 GB; tp = 8 gives 1/8.
    full = sm.replicated_bytes(SHAPES["paper-160m"], 2, True)
    assert full == 72 * 3072 * 3072 * 8 == 5_435_817_984
    assert sm.sharded_bytes(SHAPES["paper-160m"], 2, True, 8) == full // 8


def test_host_layout_is_within_the_seed_budget_at_paper_160m():
    # One 3,072² float32 GEMM buffer: 37.7 MB ≤ 64 MB.
    assert sm.host_layout_device_bytes(SHAPES["paper-160m"]) == 3072 * 3072 * 4 == 37_748_736
    assert sm.host_layout_device_bytes(SHAPES["paper-160m"]) <= 64 * 2**20


def test_flops_and_times_by_hand():
    s = SHAPES["llama3-8b"]
    assert sm.gemm_flops(s, 1e6, 2) == pytest.approx(2 * 1e6 * 14336**2 * 2 * 32)
    assert sm.gemm_flops(s, 1e6, 2, tp=8) == pytest.approx(sm.gemm_flops(s, 1e6, 2) / 8)
    assert sm.eig_seconds(8192, 10.0) == pytest.approx(80.0)  # cubic
    assert sm.lanczos_seconds(8192, 10.0) == pytest.approx(40.0)  # quadratic
    assert sm.auto_layout(7_200_000_000, 60e9) == "device" and sm.auto_layout(20e9, 60e9) == "host"


def test_prints_the_table(capsys):
    sm.main([])
    out = capsys.readouterr().out
    assert "| llama3-70b | 28,672 | 80 | 6.58 GB |" in out
    assert "37.7 MB" in out

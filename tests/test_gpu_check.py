"""benchmarks/gpu_check.sh runs end to end at toy size on the CPU (no GPU in the test suite)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_toy_mode_runs_every_check():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        ["bash", str(SCRIPT), "--toy", "--steps", "3"], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for line in (
        "StreamingCovariance on cpu, float64 state",
        "BucketedCovariance on cpu vs host",
        "background",
        "host",
    ):
        assert line in out.stdout
    assert "background rows identical: True" in out.stdout
    assert out.stdout.rstrip().endswith("gpu_check: ok")
    # The bounded-memory check: one D×D float32 GEMM buffer on the "device" (toy FFN width 128).
    assert "bounded (states='host'): device GEMM buffer 0.1 MB (<= 64 MB: True)" in out.stdout
    assert "float64 states on the device: 0" in out.stdout

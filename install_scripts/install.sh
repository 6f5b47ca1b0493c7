#!/usr/bin/env bash
# One-command install: makes .venv at the repo root with torch (CPU or CUDA), the backend (editable) and the
# test dependencies. Safe to re-run: steps that are already satisfied are quick no-ops.
#
#   bash install_scripts/install.sh            # auto: CUDA build if an NVIDIA GPU is visible, else CPU
#   bash install_scripts/install.sh --cpu      # force the CPU build
#   bash install_scripts/install.sh --cuda     # force a CUDA build (+ gsplat)
#   bash install_scripts/install.sh --no-test  # skip pytest, bpy and the glTF validator (runtime only)
set -euo pipefail

TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
MODE="auto"
WITH_TEST=1
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE="cpu" ;;
    --cuda) MODE="cuda" ;;
    --no-test) WITH_TEST=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }
step() { echo "==> $*"; }
trap 'echo "install.sh: FAILED at line $LINENO (see the output above); re-run after fixing it" >&2' ERR

command -v "$PYTHON" >/dev/null || fail "'$PYTHON' not found; install Python 3.10-3.11 or set PYTHON=/path/to/python"
"$PYTHON" - <<'PY' || fail "Python 3.11 is required (bpy==5.0.1 wheels are cp311 only); set PYTHON=/path/to/python3.11"
import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

if [ "$MODE" = "auto" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE="cuda"; else MODE="cpu"; fi
fi
step "target: $MODE build of torch $TORCH_VERSION"

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV" || fail "could not create a virtual environment (Debian: apt-get install python3-venv)"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

have_torch() { "$PY" -c "import torch,sys; v=torch.__version__.split('+')[0]; sys.exit(0 if v=='$TORCH_VERSION' and (torch.version.cuda is not None)==('$MODE'=='cuda') else 1)" 2>/dev/null; }
if have_torch; then
  step "torch $TORCH_VERSION ($MODE) already installed"
else
  step "installing torch $TORCH_VERSION ($MODE)"
  if [ "$MODE" = "cpu" ]; then
    # The CPU wheel: a local wheel where one is provided (find-links), else PyTorch's CPU index.
    "${PIP[@]}" "torch==$TORCH_VERSION" \
      || "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      || fail "could not install torch==$TORCH_VERSION (CPU)"
    have_torch || fail "torch installed but it is not the CPU build of $TORCH_VERSION"
  else
    "${PIP[@]}" "torch==$TORCH_VERSION" || fail "could not install torch==$TORCH_VERSION (CUDA)"
  fi
fi

EXTRAS=""
[ "$MODE" = "cuda" ] && EXTRAS="cuda"
[ "$WITH_TEST" = 1 ] && EXTRAS="${EXTRAS:+$EXTRAS,}test"
step "installing the backend (editable)${EXTRAS:+ with extras [$EXTRAS]}"
"${PIP[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}" || fail "pip could not install the backend; see the error above"

GLTF_VALIDATOR_VERSION="2.0.0-dev.3.10"
if [ "$WITH_TEST" = 1 ]; then
  # The Khronos glTF validator (npm) for the glTF export tests, into .tools/ (ignored by git). The tests skip
  # with a reason only where node is absent.
  if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    if [ -f "$ROOT/.tools/node_modules/gltf-validator/package.json" ] && grep -q "\"version\": \"$GLTF_VALIDATOR_VERSION\"" \
        "$ROOT/.tools/node_modules/gltf-validator/package.json"; then
      step "gltf-validator $GLTF_VALIDATOR_VERSION already installed"
    else
      step "installing gltf-validator $GLTF_VALIDATOR_VERSION (npm) into .tools/"
      mkdir -p "$ROOT/.tools"
      npm install --no-audit --no-fund --no-save --prefix "$ROOT/.tools" "gltf-validator@$GLTF_VALIDATOR_VERSION" \
        || fail "npm could not install gltf-validator@$GLTF_VALIDATOR_VERSION"
    fi
  else
    echo "   node/npm not found: the glTF validator tests will be skipped (Debian: apt-get install nodejs npm)"
  fi
fi

step "compiling the CPU compositing kernel (cached; the PyTorch compositor is used if this fails)"
"$PY" -m stag4d_backend.render.composite_cpp --build || true

step "checking the environment"
"$PY" - <<PY || fail "the installed environment does not import cleanly"
import torch, numpy, stag4d_backend
print(f"   torch {torch.__version__} (cuda={torch.cuda.is_available()}), numpy {numpy.__version__}, "
      f"stag4d_backend {stag4d_backend.__version__}")
if $WITH_TEST:
    import pytest, bpy
    print(f"   pytest {pytest.__version__}, bpy {bpy.app.version_string}")
PY
trap - ERR
step "done. Activate with: source .venv/bin/activate   (or call .venv/bin/stag4d directly)"

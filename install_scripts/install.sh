#!/usr/bin/env bash
# One-command install: makes .venv at the repo root with torch (CPU or CUDA), the backend (editable) and the
# test dependencies. Safe to re-run: steps that are already satisfied are quick no-ops.
#
#   bash install_scripts/install.sh            # auto: CUDA build if an NVIDIA GPU is visible, else CPU
#   bash install_scripts/install.sh --cpu      # force the CPU build
#   bash install_scripts/install.sh --cuda     # force a CUDA build (+ gsplat)
#   bash install_scripts/install.sh --no-test  # skip pytest, bpy and the glTF validator (runtime only)
#   bash install_scripts/install.sh --matting  # also BiRefNet's packages + the torchvision built for this torch
#   bash install_scripts/install.sh --ray      # also Ray for `stag4d serve --engine ray` (the tests get it anyway)
#   bash install_scripts/install.sh --blender-versions 4.2,4.5   # also side environments .venv-bpy-4.2, ...
#                                  (bpy wheels of older Blender releases for the version-matrix test; 'all':
#                                  every release in install_scripts/blender_versions.txt)
set -euo pipefail

TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"   # the torchvision release built against torch $TORCH_VERSION
PYTHON="${PYTHON:-python3}"
MODE="auto"
WITH_TEST=1
WITH_MATTING=0
WITH_RAY=0
BLENDER_VERSIONS=""
want_versions=0
for arg in "$@"; do
  if [ "$want_versions" = 1 ]; then BLENDER_VERSIONS="$arg"; want_versions=0; continue; fi
  case "$arg" in
    --blender-versions) want_versions=1 ;;
    --blender-versions=*) BLENDER_VERSIONS="${arg#*=}" ;;
    --cpu) MODE="cpu" ;;
    --cuda) MODE="cuda" ;;
    --no-test) WITH_TEST=0 ;;
    --matting) WITH_MATTING=1 ;;
    --ray) WITH_RAY=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[ "$want_versions" = 1 ] && { echo "install.sh: --blender-versions needs a list such as 4.2,4.5 or 'all'" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }
step() { echo "==> $*"; }
trap 'echo "install.sh: FAILED at line $LINENO (see the output above); re-run after fixing it" >&2' ERR

# --blender-versions: checked against the list of tested releases before anything is installed.
LIST="$ROOT/install_scripts/blender_versions.txt"
SERIES=()
if [ -n "$BLENDER_VERSIONS" ]; then
  KNOWN="$(grep -v '^#' "$LIST" | awk 'NF {print $1}' | paste -sd' ' -)"
  [ "$BLENDER_VERSIONS" = "all" ] && BLENDER_VERSIONS="${KNOWN// /,}"
  IFS=',' read -r -a SERIES <<< "$BLENDER_VERSIONS"
  for series in "${SERIES[@]}"; do
    [[ " $KNOWN " == *" $series "* ]] || fail "--blender-versions: '$series' is not in $LIST (known: $KNOWN)"
  done
fi

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
# Ray: the scale-out engine's tests run a local Ray cluster, so the test environment has it too.
{ [ "$WITH_RAY" = 1 ] || [ "$WITH_TEST" = 1 ]; } && EXTRAS="${EXTRAS:+$EXTRAS,}ray"
step "installing the backend (editable)${EXTRAS:+ with extras [$EXTRAS]}"
"${PIP[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}" || fail "pip could not install the backend; see the error above"

if [ "$WITH_MATTING" = 1 ]; then
  # BiRefNet's own code imports torchvision, which must be built for this very torch: PyPI's wheel pairs with the
  # CUDA build (beside the CPU build its import fails: "operator torchvision::nms does not exist"), and a plain
  # "torchvision" or timm's own requirement would pull a newer torch. So: the matching build first, from
  # PyTorch's CPU index for a CPU torch, then the extra with torch and torchvision pinned.
  step "installing torchvision $TORCHVISION_VERSION for torch $TORCH_VERSION ($MODE) and the [matting] extra"
  have_tv() { "$PY" -c "import torch, torchvision.ops as o; o.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); \
import sys; sys.exit(0 if torchvision.__version__.split('+')[0] == '$TORCHVISION_VERSION' else 1)" 2>/dev/null; }
  if ! have_tv; then
    if [ "$MODE" = "cpu" ]; then
      "${PIP[@]}" --no-deps --force-reinstall "torchvision==$TORCHVISION_VERSION" \
        --index-url https://download.pytorch.org/whl/cpu || true
    else
      "${PIP[@]}" --no-deps --force-reinstall "torchvision==$TORCHVISION_VERSION" || true
    fi
  fi
  if ! have_tv; then
    "$PY" -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true   # a broken torchvision breaks transformers
    fail "no working torchvision $TORCHVISION_VERSION for torch $TORCH_VERSION ($MODE) could be installed (the CPU \
build comes from https://download.pytorch.org/whl/cpu, which this machine cannot reach?); everything else is \
installed. Matting stays unavailable: give RGBA input, or --matting color-key / white-key"
  fi
  PINS="$(mktemp)"; printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$PINS"
  "${PIP[@]}" -c "$PINS" -e "$ROOT[matting]" || fail "could not install the [matting] extra; see the error above"
  rm -f "$PINS"
fi

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

# Side environments for the Blender version matrix: one venv per release series with that release's bpy wheel
# (and the numpy it pins). The add-on itself needs nothing else; the test drives them as subprocesses.
if [ "${#SERIES[@]}" -gt 0 ]; then
  MAIN_BPY="$("$PY" -c 'import importlib.metadata as m; print(m.version("bpy"))' 2>/dev/null || true)"
  for series in "${SERIES[@]}"; do
    wheel="$(awk -v s="$series" '!/^#/ && $1 == s {print $2}' "$LIST")"
    extra="$(awk -v s="$series" '!/^#/ && $1 == s {$1 = $2 = ""; print}' "$LIST")"
    if [ "$wheel" = "$MAIN_BPY" ]; then
      step "Blender $series: the main environment's bpy $wheel (no side environment needed)"
      continue
    fi
    SIDE="$ROOT/.venv-bpy-$series"
    if [ -x "$SIDE/bin/python" ] && "$SIDE/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('bpy') != '$wheel')" 2>/dev/null \
        && { [ -z "${extra// /}" ] || "$SIDE/bin/python" -m pip install --disable-pip-version-check -q $extra; }; then
      step "Blender $series: bpy $wheel already in $SIDE"
      continue
    fi
    step "Blender $series: side environment $SIDE with bpy $wheel"
    [ -x "$SIDE/bin/python" ] || "$PYTHON" -m venv "$SIDE" || fail "could not create $SIDE"
    # shellcheck disable=SC2086 # $extra: zero or more requirements, split on spaces
    "$SIDE/bin/python" -m pip install --disable-pip-version-check "bpy==$wheel" $extra \
      || fail "could not install bpy==$wheel into $SIDE (is it on PyPI for this Python?)"
    "$SIDE/bin/python" -c "import bpy; print('   bpy', bpy.app.version_string)" \
      || fail "bpy $wheel installed in $SIDE but does not import"
  done
fi
trap - ERR
step "done. Activate with: source .venv/bin/activate   (or call .venv/bin/stag4d directly)"

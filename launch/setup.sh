#!/usr/bin/env bash
# One-stop set-up for a fresh machine: makes a project-local virtual environment in .venv,
# installs the right torch build (CPU unless a CUDA GPU is present), the project and its test
# tools, then runs what was asked:
#   bash launch/setup.sh demo [ARGS...]   the main job (a local swarm on the built-in corpus)
#   bash launch/setup.sh test [ARGS...]   lint, format check, type check, then the whole test suite
#                                          (installs Chromium for browser tests; ARGS go to pytest)
#   bash launch/setup.sh install          only the set-up
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
TORCH_VERSION="${SWARM_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
action="${1:-demo}"
[ $# -gt 0 ] && shift

log() { printf '[setup] %s\n' "$*" >&2; }

have_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
}

install_torch() {
  if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    return
  fi
  if have_cuda; then
    log "CUDA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    log "no CUDA GPU: installing the CPU build of torch==$TORCH_VERSION"
    # The CPU build is 'torch==X+cpu': found directly where pip already knows a source for it
    # (a local wheel directory, a configured mirror); otherwise PyTorch's CPU index. Either way
    # no gigabytes of CUDA packages that a CPU-only machine cannot use.
    "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
           --extra-index-url https://pypi.org/simple
  fi
}

install_project() {
  local extras="$1"
  log "installing swarm${extras} and its dependencies"
  "${PIP[@]}" install -e ".${extras}" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import swarm, models, launch, hivemind" \
    || { log "installation failed"; exit 1; }
}

install_chromium() {
  # Browser tests drive Debian's Chromium through Playwright (no browser download).
  if command -v chromium >/dev/null 2>&1; then return; fi
  if command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium for the browser tests"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  else
    log "no apt-get: browser tests will be skipped unless chromium is on PATH"
  fi
}

install_netns_tools() {
  # The shaped-link / NAT testbed (launch/testbed.py) needs ip and tc (iproute2), nft (nftables) for
  # NAT routers and iptables for link delays on kernels without sch_netem. Only as root: tests skip
  # where namespaces cannot be made.
  [ "$(id -u)" -eq 0 ] || return 0
  command -v apt-get >/dev/null 2>&1 || return 0
  local missing=()
  command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing+=(iproute2)
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  command -v iptables-legacy >/dev/null 2>&1 || missing+=(iptables)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} for the network testbed"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

case "$action" in
  install)
    make_venv; install_torch; install_project "[test]"
    ;;
  demo)
    make_venv; install_torch; install_project ""
    exec "$VENV/bin/swarm-demo" "$@"
    ;;
  test)
    make_venv; install_torch; install_project "[test]"; install_chromium; install_netns_tools
    # Lint, format and types first (seconds); any finding fails the run before the tests start.
    log "ruff check, ruff format --check, mypy"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    # Two workers, each taking whole test files (a module's shared swarm starts once; files are
    # independent). Most of the suite waits on swarm rounds, so two workers halve it even on two
    # cores. Pass -n 0 to run in one process.
    exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
    ;;
  *)
    echo "usage: bash launch/setup.sh {demo|test|install} [ARGS...]" >&2
    exit 2
    ;;
esac

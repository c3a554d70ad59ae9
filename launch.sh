#!/usr/bin/env bash
# One entry point for the pipeline. Every subcommand sets up .venv on first use (idempotent:
# a second run starts at once) and passes the rest of its arguments to the Python entry point.
#
#   ./launch.sh help            list subcommands
#   ./launch.sh test [PYTEST_ARGS...]   install test requirements, run the suite (what CI runs)
#   ./launch.sh demo            the main job on an embedded default corpus
#   ./launch.sh prep ARGS...    python -m data_prep ARGS...
#
# Environment: VENV (default ./.venv), PYTHON (interpreter used to create the venv, default
# python3), TORCH_SPEC (torch requirement; default torch==2.13.0 on machines without a GPU,
# whose CPU wheel lies on the reference machine's disk), TORCH_INDEX_URL (extra pip index for torch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

log() { printf '\033[1m[launch]\033[0m %s\n' "$*" >&2; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# ensure_env REQUIREMENTS_FILE: create the venv and install torch first, then the requirements.
# A stamp named after the hash of the requirement files makes reruns instant.
ensure_env() {
    local req="$1"
    local hash
    hash="$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)"
    local stamp="$VENV/.installed-$(basename "$req" .txt)-$hash"
    if [[ -f "$stamp" ]]; then
        return 0
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating virtual environment in $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        local spec="${TORCH_SPEC:-}"
        if [[ -z "$spec" ]]; then
            if has_gpu; then spec="torch>=2.5,<2.15"; else spec="torch==2.13.0"; fi
        fi
        log "installing $spec first (so no other package pulls a different build)"
        "${pip[@]}" install -q "$spec" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
    fi
    log "installing $req"
    "${pip[@]}" install -q -r "$req"
    "${pip[@]}" install -q --no-deps --no-build-isolation -e .
    touch "$stamp"
}

py() { "$VENV/bin/python" "$@"; }

cmd_help() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

cmd_test() {
    ensure_env requirements-test.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    log "running the test suite"
    py -m pytest "$@"
}

cmd_prep() {
    ensure_env requirements.txt
    py -m data_prep "$@"
}

cmd_demo() {
    ensure_env requirements.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    py -m optim.demo "$@"
}

sub="${1:-demo}"
[[ $# -gt 0 ]] && shift
case "$sub" in
    help|-h|--help) cmd_help ;;
    test) cmd_test "$@" ;;
    demo) cmd_demo "$@" ;;
    prep) cmd_prep "$@" ;;
    *) log "unknown subcommand '$sub'"; cmd_help; exit 2 ;;
esac

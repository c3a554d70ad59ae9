#!/usr/bin/env bash
# One entry point for the pipeline. Each subcommand sets up .venv on first use (idempotent: a
# second run starts at once) and passes its other arguments to the Python entry point.
#
#   ./launch.sh demo                  the whole pipeline on an embedded corpus (default subcommand)
#   ./launch.sh test [PYTEST_ARGS]    install the test requirements and run the suite (what CI runs)
#   ./launch.sh prep ARGS             python -m data_prep ARGS  (vocab | build | inspect | embedded-corpus)
#   ./launch.sh pretrain [--phase 1|2|both] [--config1 CFG] [--config2 CFG] [--data-dir DIR]
#                        [--output-dir DIR] [--np N] [--hostfile H] [--launcher deepspeed|mpi|slurm]
#                        [RUN_ARGS]   phase 1, phase 2 or both chained (run.py flags pass through)
#                        --launcher slurm: each phase is an srun step (inside sbatch/salloc; see
#                        slurm/pretrain.sbatch). A phase stopped before its last step (a signal,
#                        --stop-after) exits 75 and the next phase does not start
#   ./launch.sh squad ARGS            python finetune/squad.py ARGS  (--np N: DeepSpeed processes)
#   ./launch.sh export CKPT OUT       python -m pretrain.export CKPT OUT
#   ./launch.sh bench NAME [ARGS]     python bench/NAME.py ARGS  (optim_step, data_prep, squad, ...)
#   ./launch.sh help
#
# Environment: VENV (default ./.venv), PYTHON (creates the venv, default python3), TORCH_SPEC
# (default torch==2.13.0 without a GPU: the CPU wheel), TORCH_INDEX_URL (extra index for torch),
# SQUAD_DIR (demo: a directory with train-v1.1*.json and dev-v1.1*.json files), LAUNCH_DRY_RUN=1
# (print the commands pretrain/squad would run instead of running them).
set -euo pipefail

# Exit status of `pretrain` (any launcher) when a phase stopped on request (a signal) before its
# last step: its checkpoint is saved and a rerun with --resume continues (EX_TEMPFAIL, "try again").
STOPPED_EXIT=75

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

log() { printf '\033[1m[launch]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# ensure_env REQUIREMENTS_FILE: create the venv, install torch first, then the requirements.
# A stamp named after the hash of the requirement files makes reruns instant.
ensure_env() {
    [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]] && return 0
    local req="$1" hash stamp
    hash="$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)"
    stamp="$VENV/.installed-$(basename "$req" .txt)-$hash"
    [[ -f "$stamp" ]] && return 0
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
        log "installing $spec first (so no other package pulls a different torch build)"
        "${pip[@]}" install -q "$spec" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
    fi
    log "installing $req"
    "${pip[@]}" install -q -r "$req"
    if [[ "$req" == requirements-bench.txt ]]; then
        # Their torchvision dependency would replace the CPU torch; the benchmark needs torch only.
        "${pip[@]}" install -q --no-deps "timm>=1.0,<2" "pytorch-lamb>=1.0,<2"
    fi
    "${pip[@]}" install -q --no-deps --no-build-isolation -e .
    touch "$stamp"
}

py() { "$VENV/bin/python" "$@"; }

# run CMD...: run it, or with LAUNCH_DRY_RUN=1 print it (one shell-quoted line).
run() {
    if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"; printf '\n'
    else
        "$@"
    fi
}

# launcher NPROCS HOSTFILE KIND: the command prefix that starts run.py / squad.py on every rank.
launcher() {
    local np="$1" hostfile="$2" kind="$3"
    if [[ "$kind" == mpi ]]; then
        local mpiexec="$VENV/bin/mpiexec"
        [[ -x "$mpiexec" ]] || mpiexec="$(command -v mpiexec || command -v mpirun || true)"
        [[ -n "$mpiexec" ]] || die "no mpiexec/mpirun found (pip install mpich, or load your MPI module)"
        local args=("$mpiexec" -n "$np")
        # MPICH's flag; OpenMPI's mpirun takes --hostfile (set MPI_HOSTFILE_FLAG=--hostfile)
        [[ -n "$hostfile" ]] && args+=("${MPI_HOSTFILE_FLAG:--f}" "$hostfile")
        printf '%s\n' "${args[@]}" "$VENV/bin/python"
    elif [[ "$kind" == slurm ]]; then
        # One task per rank; the allocation (sbatch/salloc) decides nodes and GPUs. A rank that
        # fails ends the step instead of leaving the others waiting in a collective.
        local args=(srun)
        [[ -n "$np" ]] && args+=(--ntasks "$np")
        printf '%s\n' "${args[@]}" --kill-on-bad-exit=1 "$VENV/bin/python"
    else
        local args=("$VENV/bin/python" -m deepspeed.launcher.runner)
        if [[ -n "$hostfile" ]]; then
            args+=(--hostfile "$hostfile")
        elif has_gpu; then
            [[ -n "$np" ]] && args+=(--num_gpus "$np")
        else
            args+=(--num_gpus "${np:-2}")
        fi
        printf '%s\n' "${args[@]}"
    fi
}

cmd_help() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

cmd_test() {
    ensure_env requirements-test.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    log "running the test suite"
    py -m pytest "$@"
}

cmd_prep() { ensure_env requirements.txt; py -m data_prep "$@"; }
cmd_export() { ensure_env requirements.txt; py -m pretrain.export "$@"; }

cmd_squad() {
    ensure_env requirements.txt
    local np="" rest=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --np) np="$2"; shift 2 ;;
            *) rest+=("$1"); shift ;;
        esac
    done
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    if [[ -n "$np" ]]; then
        mapfile -t pre < <(launcher "$np" "" deepspeed)
        run "${pre[@]}" finetune/squad.py "${rest[@]}"
    else
        run "$VENV/bin/python" finetune/squad.py "${rest[@]}"
    fi
}

cmd_pretrain() {
    ensure_env requirements.txt
    local phase=both config1=ds_configs/lamb_64k.json config2=ds_configs/lamb_32k.json
    local data_dir="" output_dir="" np="" hostfile="" kind=deepspeed rest=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --phase) phase="$2"; shift 2 ;;
            --config1) config1="$2"; shift 2 ;;
            --config2) config2="$2"; shift 2 ;;
            --data-dir) data_dir="$2"; shift 2 ;;
            --output-dir) output_dir="$2"; shift 2 ;;
            --np) np="$2"; shift 2 ;;
            --hostfile) hostfile="$2"; shift 2 ;;
            --launcher) kind="$2"; shift 2 ;;
            *) rest+=("$1"); shift ;;
        esac
    done
    [[ "$phase" =~ ^(1|2|both)$ ]] || die "--phase must be 1, 2 or both (got '$phase')"
    [[ "$kind" =~ ^(deepspeed|mpi|slurm)$ ]] || die "--launcher must be deepspeed, mpi or slurm (got '$kind')"
    [[ "$kind" == mpi && -z "$np" ]] && die "--launcher mpi needs --np N (total processes)"
    [[ "$kind" == slurm && -n "$hostfile" ]] \
        && die "--hostfile does not apply to --launcher slurm (the allocation decides the nodes)"
    mapfile -t pre < <(launcher "$np" "$hostfile" "$kind")
    local p1=() p2=() out1="" out2=""
    [[ -n "$data_dir" ]] && p1+=(--data "$data_dir/seq128") && p2+=(--data "$data_dir/seq512")
    [[ -n "$output_dir" ]] && p1+=(--output "$output_dir/phase1") && p2+=(--output "$output_dir/phase2" --init-checkpoint "$output_dir/phase1")
    # A phase's output tells a finished phase from a stopped one (run.py exits 0 either way).
    out1="$(flag_value --output "${p1[@]}" "${rest[@]}")" out2="$(flag_value --output "${p2[@]}" "${rest[@]}")"
    if [[ "$kind" == slurm ]]; then
        [[ -n "$out1" ]] \
            || die "--launcher slurm needs --output-dir DIR (or --output): a requeued job resumes from there"
        # srun answers the SIGUSR1 a batch script forwards by passing it to the ranks, SIGTERM by
        # killing them: this shell must outlive both and report how the step ended.
        trap 'log "stop signal received: the ranks save at the next step boundary"' USR1 TERM
    fi
    if [[ "$phase" == 1 || "$phase" == both ]]; then
        pretrain_phase 1 "$config1" "$kind" "$out1" \
            "${pre[@]}" pretrain/run.py --config "$config1" "${p1[@]}" "${rest[@]}"
    fi
    if [[ "$phase" == 2 || "$phase" == both ]]; then
        pretrain_phase 2 "$config2" "$kind" "$out2" \
            "${pre[@]}" pretrain/run.py --config "$config2" "${p2[@]}" "${rest[@]}"
    fi
}

# flag_value FLAG ARGS...: the value after the last FLAG in ARGS (empty when absent).
flag_value() {
    local flag="$1" value=""; shift
    while [[ $# -gt 0 ]]; do
        [[ "$1" == "$flag" && $# -gt 1 ]] && value="$2"
        shift
    done
    printf '%s' "$value"
}

# phase_finished OUT: OUT's newest complete checkpoint is its run's last step (max_steps as that
# run saved it in model_config.json): status 0, 1 when it is not; a checkpoint that cannot be read
# stops here (exit 2) rather than start the next phase or requeue a job that would fail the same way.
phase_finished() {
    local rc=0
    py - "$1" <<'PY' || rc=$?
import json, sys
from pathlib import Path
ckpt = Path(sys.argv[1]) / "checkpoints"
try:
    from pretrain import checkpoint
    tag = checkpoint.latest_tag(ckpt)
    done = tag is not None and checkpoint.step_of(tag) >= \
        json.loads((ckpt / tag / "model_config.json").read_text())["pretrain"]["max_steps"]
except Exception as exc:  # noqa: BLE001 - whatever it is, the shell reports it in one line
    print(f"[launch] cannot tell whether {ckpt} is finished: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(3)
sys.exit(0 if done else 1)
PY
    [[ $rc -le 1 ]] || die "phase output $1: see the line above"
    return "$rc"
}

# pretrain_phase N CONFIG KIND OUT CMD...: run one phase. A phase that returned before its last
# step stopped on request (a signal, --stop-after): the next phase must not start from it, so exit
# STOPPED_EXIT (whatever the launcher; not checkable when the output is unknown). Under Slurm a
# phase whose output is finished is also skipped (a requeued job does not start it again).
pretrain_phase() {
    local n="$1" config="$2" kind="$3" out="$4"; shift 4
    local dry=0
    [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]] && dry=1
    if [[ "$kind" == slurm && $dry == 0 ]] && phase_finished "$out"; then
        log "phase $n: $out is finished already, skipping"
        return 0
    fi
    log "phase $n: $config"
    local rc=0
    run "$@" || rc=$?
    [[ $rc == 0 ]] || exit "$rc"
    if [[ $dry == 0 && -n "$out" ]] && ! phase_finished "$out"; then
        log "phase $n stopped before its last step; its checkpoint in $out continues with --resume (exit $STOPPED_EXIT)"
        exit "$STOPPED_EXIT"
    fi
}

cmd_bench() {
    [[ $# -ge 1 ]] || die "usage: ./launch.sh bench NAME [ARGS] (NAME: $(ls bench | sed -n 's/\.py$//p' | tr '\n' ' '))"
    local name="$1"; shift
    [[ -f "bench/$name.py" ]] || die "no bench/$name.py"
    ensure_env requirements-bench.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    py "bench/$name.py" "$@"
}

cmd_demo() {
    ensure_env requirements.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    local out="${DEMO_OUT:-demo_out}" t0=$SECONDS
    mkdir -p "$out"
    log "1/6 corpus: Python's own documentation, written as plain text"
    py -m data_prep embedded-corpus "$out/corpus"
    log "2/6 WordPiece vocab (8,000 tokens)"
    py -m data_prep vocab --input "$out/corpus" --output "$out/vocab" --vocab-size 8000
    log "3/6 pretraining shards for seq 128 and 512 from one tokenization"
    py -m data_prep build --input "$out/corpus" --vocab "$out/vocab" --output "$out/data" --seq-lens 128,512 \
        --shards 4 --no-progress
    log "4/6 phase 1 (seq 128) then phase 2 (seq 512): bert-tiny, LAMB, ZeRO-2, precision auto, 2 processes"
    # --resume: a second demo continues (here: finds both phases finished) instead of starting over
    cmd_pretrain --config1 ds_configs/cpu_seq128.json --config2 ds_configs/cpu_seq512.json \
        --data-dir "$out/data" --output-dir "$out" --resume "$@"
    log "5/6 export to a Hugging Face model directory"
    py -m pretrain.export "$out/phase2" "$out/hf"
    local squad_note="SQuAD skipped: set SQUAD_DIR to a directory with train-v1.1*.json and dev-v1.1*.json"
    if [[ -n "${SQUAD_DIR:-}" ]]; then
        local train dev
        train="$(ls "$SQUAD_DIR"/train-v1.1*.json 2>/dev/null | head -1 || true)"
        dev="$(ls "$SQUAD_DIR"/dev-v1.1*.json 2>/dev/null | head -1 || true)"
        if [[ -n "$train" && -n "$dev" ]]; then
            # --resume: a demo stopped here continues; one that finished leaves the scores alone
            log "6/6 SQuAD v1.1: fine-tune the exported model on a slice of $train, predict a slice of $dev"
            py finetune/squad.py --checkpoint "$out/hf" --train-file "$train" --predict-file "$dev" \
                --output "$out/squad" --max-seq-length 192 --doc-stride 64 --epochs 1 \
                --max-train-examples 800 --max-predict-examples 300 --batch-size 16 --lr 1e-4 --resume
            squad_note="SQuAD: $(py -c "import json;m=json.load(open('$out/squad/metrics.json'));print(f\"EM {m['exact_match']:.1f} F1 {m['f1']:.1f}\")") (bert-tiny after minutes of pretraining: expect low)"
        else
            squad_note="SQuAD skipped: no train-v1.1*.json and dev-v1.1*.json in $SQUAD_DIR"
        fi
    else
        log "6/6 $squad_note"
    fi
    cat >&2 <<SUMMARY

================================ demo finished in $((SECONDS - t0)) s ================================
corpus, vocab, shards   $out/corpus  $out/vocab  $out/data/seq{128,512}
phase 1 (seq 128)       $out/phase1   (metrics.jsonl, tensorboard/, checkpoints/)
phase 2 (seq 512)       $out/phase2
exported model          $out/hf       (transformers.AutoModelForPreTraining.from_pretrained)
$squad_note
next: tensorboard --logdir $out    |    ./launch.sh help
      a cluster run: ./launch.sh pretrain --data-dir DATA --output-dir runs/lamb --hostfile hosts
SUMMARY
}

main() {
    local sub="${1:-demo}"
    [[ $# -gt 0 ]] && shift
    case "$sub" in
        help|-h|--help) cmd_help ;;
        test) cmd_test "$@" ;;
        demo) cmd_demo "$@" ;;
        prep) cmd_prep "$@" ;;
        pretrain) cmd_pretrain "$@" ;;
        squad) cmd_squad "$@" ;;
        export) cmd_export "$@" ;;
        bench) cmd_bench "$@" ;;
        *) log "unknown subcommand '$sub'"; cmd_help; exit 2 ;;
    esac
}

# One line, read whole before it runs: editing this file during a long run cannot derail it.
main "$@"; exit $?

#!/usr/bin/env bash
# Submit one iteration as a chain of plain sbatch jobs, no driver needed: every stage of the
# iteration's plan (python -m jobs.sbatch chain: the registered stages, in order), each a job of
# slurm/unit.sbatch, a sharded one an array followed by slurm/merge.sbatch; each job starts only
# when the one before ended well (--dependency=afterok; a job whose dependency failed is
# cancelled, not left pending). Units the manifest lists as done exit at once, so submitting
# the chain again resumes it. The last line printed is the chain's last job.
#
#   slurm/iteration.sh CONFIG ITER [--baseline] [sbatch flags for every job, e.g. -A gts-pi -q embers]
#
# Per-stage flags, by the cluster-profile section a stage takes its resources from
# (MINE, GENERATE, VERIFY, TRAIN, EVALUATE; MERGE for merges), e.g.
#   DISTILL_SBATCH_GENERATE="--gres=gpu:H100:1 --cpus-per-task=8 --time=04:00:00"
#   DISTILL_SBATCH_TRAIN="--nodes=2 --ntasks-per-node=1 --gres=gpu:H100:4 --cpus-per-task=16"
#     (train.distributed: ddp or fsdp: torchrun on each node, see slurm/unit.sbatch)
# Array parallelism: $DISTILL_ARRAY_PARALLELISM (default 4).
set -euo pipefail
usage="usage: slurm/iteration.sh CONFIG ITER [--baseline] [sbatch flags...]"
config="$(realpath "${1:?$usage}")"
iter="${2:?$usage}"
# The jobs run in the submission directory: the project root, where `jobs` and relative paths are.
cd "$(dirname "$0")/.."
shift 2
plan=()
if [[ "${1:-}" == "--baseline" ]]; then
    plan=(--baseline)
    shift
fi
python="${PYTHON:-python}"
par="${DISTILL_ARRAY_PARALLELISM:-4}"
common=("$@")

# submit SECTION DEPENDENCY SBATCH-ARGS...: the job id of the submitted job.
submit() {
    local section=$1 dep=$2 var
    shift 2
    var="DISTILL_SBATCH_${section^^}"
    # shellcheck disable=SC2086
    sbatch --parsable --kill-on-invalid-dep=yes ${dep:+--dependency=afterok:$dep} "${common[@]}" ${!var:-} "$@"
}

# Inputs checked, hub models resolved into the Hugging Face cache, the run created: here, on
# the login node, before any job is queued.
if (( ${#plan[@]} == 0 )); then
    "$python" -m jobs.sbatch prepare --config "$config" --iter "$iter" >&2
fi
stages=$("$python" -m jobs.sbatch chain --config "$config" --iter "$iter" "${plan[@]}")
dep=""
while read -r stage units sharded section; do
    if (( sharded )); then
        dep=$(submit "$section" "$dep" --job-name="distill-$stage" --array="0-$((units - 1))%$par" \
            slurm/unit.sbatch "$stage" "$config" "$iter")
        printf '%-17s %s (array of %s)\n' "$stage" "$dep" "$units"
        dep=$(submit merge "$dep" slurm/merge.sbatch "$config" "$iter" "$stage")
        printf '%-17s %s\n' merge "$dep"
    else
        dep=$(submit "$section" "$dep" --job-name="distill-$stage" slurm/unit.sbatch "$stage" "$config" "$iter")
        printf '%-17s %s\n' "$stage" "$dep"
    fi
done <<< "$stages"

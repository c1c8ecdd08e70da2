#!/usr/bin/env bash
# The UNDO loop as plain sbatch jobs, no driver needed: iteration ITER's chain (slurm/iteration.sh),
# then a small job (slurm/next.sbatch) that asks distill whether the loop goes on
# (python -m jobs.sbatch next: undo.max_iters, undo.patience, as the driver decides) and, if it
# does, submits the next iteration's chain and another such job from inside the allocation.
#
#   slurm/undo.sh CONFIG [ITER, default 0] [sbatch flags for every job]
#
# The sbatch flags and $DISTILL_SBATCH_* reach the later iterations through the environment
# (sbatch exports it). Submitting again resumes: done units exit at once.
set -euo pipefail
usage="usage: slurm/undo.sh CONFIG [ITER] [sbatch flags...]"
config="$(realpath "${1:?$usage}")"
shift
iter=0
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    iter=$1
    shift
fi
cd "$(dirname "$0")/.."
export DISTILL_UNDO_FLAGS="${DISTILL_UNDO_FLAGS:-$*}"
# shellcheck disable=SC2086
chain=$(slurm/iteration.sh "$config" "$iter" $DISTILL_UNDO_FLAGS)
echo "$chain"
last=$(tail -n 1 <<< "$chain" | awk '{print $2}')
# shellcheck disable=SC2086
next=$(sbatch --parsable --kill-on-invalid-dep=yes --dependency="afterok:$last" $DISTILL_UNDO_FLAGS \
    ${DISTILL_SBATCH_MERGE:-} slurm/next.sbatch "$config" "$iter")
printf '%-17s %s\n' next "$next"

#!/usr/bin/env bash
# Submit one iteration as a chain of plain sbatch jobs, no driver needed:
#
#   [mine] -> generate array -> merge generate -> verify -> train -> evaluate array -> merge evaluate
#
# each step starting only when the previous one ended well (--dependency=afterok). Units the
# manifest already lists as done exit at once, so submitting the chain again resumes it.
#
#   slurm/iteration.sh CONFIG ITER [sbatch flags for every job, e.g. -A gts-pi -q embers]
#
# Per-stage flags: $DISTILL_SBATCH_<STAGE> (MINE, GENERATE, VERIFY, TRAIN, EVALUATE, MERGE), e.g.
#   DISTILL_SBATCH_GENERATE="--gres=gpu:H100:1 --cpus-per-task=8"
#   DISTILL_SBATCH_TRAIN="--nodes=2 --ntasks-per-node=1 --gres=gpu:H100:4 --cpus-per-task=16"
#     (train.distributed: ddp or fsdp: torchrun on each node, see slurm/train.sbatch)
# Array parallelism: $DISTILL_ARRAY_PARALLELISM (default 4). Prints the job ids.
set -euo pipefail
config="$(realpath "${1:?usage: slurm/iteration.sh CONFIG ITER [sbatch flags...]}")"
iter="${2:?usage: slurm/iteration.sh CONFIG ITER [sbatch flags...]}"
# The jobs run in the submission directory: the project root, where `jobs` and relative paths are.
cd "$(dirname "$0")/.."
shift 2
python="${PYTHON:-python}"
par="${DISTILL_ARRAY_PARALLELISM:-4}"

# submit STAGE DEPENDENCY SBATCH-ARGS...: the job id of the submitted job.
submit() {
    local stage=$1 dep=$2 var
    shift 2
    var="DISTILL_SBATCH_${stage^^}"
    # shellcheck disable=SC2086
    sbatch --parsable ${dep:+--dependency=afterok:$dep} "${common[@]}" ${!var:-} "$@"
}
common=("$@")

# Inputs checked, hub models resolved into the Hugging Face cache, the run created: here, on
# the login node, before any job is queued.
"$python" -m jobs.stage prepare --config "$config" --iter "$iter" >&2
dep=""
if (( iter > 0 )); then
    dep=$(submit mine "" slurm/mine.sbatch "$config" "$iter")
    echo "mine      $dep"
fi
n=$("$python" -m jobs.stage count generate --config "$config" --iter "$iter")
gen=$(submit generate "$dep" --array="0-$((n - 1))%$par" slurm/generate.sbatch "$config" "$iter")
echo "generate  $gen (array of $n)"
merge_gen=$(submit merge "$gen" slurm/merge.sbatch "$config" "$iter" generate)
echo "merge     $merge_gen"
ver=$(submit verify "$merge_gen" slurm/verify.sbatch "$config" "$iter")
echo "verify    $ver"
train=$(submit train "$ver" slurm/train.sbatch "$config" "$iter")
echo "train     $train"
n=$("$python" -m jobs.stage count evaluate --config "$config" --iter "$iter")
ev=$(submit evaluate "$train" --array="0-$((n - 1))%$par" slurm/evaluate.sbatch "$config" "$iter")
echo "evaluate  $ev (array of $n)"
merge_ev=$(submit merge "$ev" slurm/merge.sbatch "$config" "$iter" evaluate)
echo "merge     $merge_ev"

# Sourced by slurm/*.sbatch: the environment, and the stop-signal -> safe stop -> requeue dance.
#
# SLURM sends USR2 to this batch shell (#SBATCH --signal=B:USR2@<s>) before the time limit and at
# preemption. The trap forwards it to the stage (python -m jobs.sbatch), which stops at a safe
# point, saves, records the requeue in the manifest and exits 3; then this job requeues itself.
# The stage decides whether requeues are left (--max-requeues, $DISTILL_MAX_REQUEUES).
#
# A job of several tasks (--ntasks=2, or --nodes=2 --ntasks-per-node=1) runs the stage in each with
# srun, which passes the forwarded USR2 on to every task. A distributed unit (train.distributed:
# ddp|fsdp) then runs torchrun in each task, its ranks meeting on the first host (jobs.launch);
# task 0 reads rank 0's outcome and exits 3 for a requeue, the others exit 0 once their ranks
# have ended. Any other stage refuses a job of several tasks.
#
# Environment: $DISTILL_ENV, when set, is sourced first (e.g. env/pace.sh: module load + conda
# activate); else the python on PATH at submission time is used (sbatch exports the environment).

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "${DISTILL_ENV:-}" ]]; then
    # shellcheck disable=SC1090
    source "$DISTILL_ENV"
fi
PYTHON="${PYTHON:-python}"
REQUEUE_STATUS=3

# This job's id as scontrol wants it: 123_4 for an array task, 123 otherwise.
own_job_id() {
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID}"
    fi
}

# run_stage ARGS...: python -m jobs.sbatch ARGS (in every task of the job), with USR2 forwarded and
# requeue on status 3.
run_stage() {
    local child status tasks=${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}} launch=()
    if (( tasks > 1 )); then
        # srun's status is the highest of the tasks'. Not --kill-on-bad-exit: task 0's 3 would
        # kill the tasks still ending and srun would report 143, so no requeue. --wait ends the
        # step a minute after its first task ended (a peer that died before the rendezvous).
        # srun does not inherit sbatch's --cpus-per-task (slurm 22.05 on): it is passed on.
        launch=(srun --kill-on-bad-exit=0 --wait=60 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})
    fi
    echo "distill: $(date '+%F %T') job $(own_job_id) on $(hostname -s), restart ${SLURM_RESTART_COUNT:-0}, $tasks task(s): jobs.sbatch $*"
    "${launch[@]}" "$PYTHON" -u -m jobs.sbatch "$@" &
    child=$!
    trap 'echo "distill: USR2 received, asking the stage to stop at a safe point"; kill -USR2 "$child" 2>/dev/null' USR2
    # `wait` returns early when a trapped signal arrives; wait again until the stage has exited,
    # then once more for its real exit status (bash remembers it).
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    wait "$child"
    status=$?
    trap - USR2
    if (( status == REQUEUE_STATUS )); then
        echo "distill: $(date '+%F %T') requeueing $(own_job_id)"
        scontrol requeue "$(own_job_id)"
        # The requeue ends this allocation; exit in case it has not yet.
        exit 0
    fi
    echo "distill: $(date '+%F %T') stage exited with status $status"
    exit "$status"
}

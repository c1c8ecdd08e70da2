# Source me in a PACE (Georgia Tech Phoenix) job or login shell: the conda environment of
# env/environment.yml, and settings that jobs on shared nodes want.
#   source env/pace.sh                     # interactive
#   DISTILL_ENV=env/pace.sh sbatch ...     # plain sbatch scripts (slurm/*.sbatch source it)
# The driver's jobs get the same lines from configs/cluster/pace.yaml (`setup:`).
# DISTILL_CONDA_ENV overrides the environment's name (default: distill).

module load anaconda3
# Batch shells have not run `conda init`: load conda's shell functions first.
eval "$(conda shell.bash hook)"
conda activate "${DISTILL_CONDA_ENV:-distill}"

# Python output straight to the SLURM log, not in 8 KiB chunks.
export PYTHONUNBUFFERED=1
# One OpenMP thread per CPU SLURM gave the job, not per CPU of the node.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# Model and tokenizer caches out of the small home quota (~/scratch on Phoenix; adjust if yours
# differs).
export HF_HOME="${HF_HOME:-$HOME/scratch/hf}"

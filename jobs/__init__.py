"""Batch-job glue: the iteration driver, a unit of a stage as a submitit job or an sbatch CLI,
stop signals, executors and cluster profiles. Nothing here knows what a stage does."""

"""Batch-job glue: stage callables for submitit, executor selection, the iteration driver."""

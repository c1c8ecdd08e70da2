"""A config's `plugins: [tests.count_plugin]` registers `count_verified` (tests/count_stage.py)
after verify in every process that loads the config: the driver's, and each plain sbatch job's."""

from distill import pipeline
from tests.count_stage import COUNT

pipeline.register(COUNT, after="verify")

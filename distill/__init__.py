"""distill: iterative teacher -> student distillation for math reasoning."""

__version__ = "0.1.0"

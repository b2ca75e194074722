"""synthpert: distil frontier-model reasoning about genetic perturbations into small language models."""

__version__ = "0.1.0"

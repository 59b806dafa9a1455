"""Distillation methods: one file each, registered by name (see base.py)."""

from kdpipe.stage2_distill.methods import annealing_kd, distilbert, kd, lm, pd  # noqa: F401  (registration)
from kdpipe.stage2_distill.methods.base import METHODS, Batch, Context, Method, Needs, StudentOutput  # noqa: F401

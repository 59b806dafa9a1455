"""Distillation methods: one file each, registered by name (see base.py)."""

from kdpipe.stage2_distill.methods import annealing_kd, distilbert, kd, lm, minilmv2, pd, pkd  # noqa: F401
from kdpipe.stage2_distill.methods.base import METHODS, Batch, Context, Method, Needs, StudentOutput  # noqa: F401

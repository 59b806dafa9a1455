"""Distillation methods: one file each, registered by name (see base.py)."""

from kdpipe.stage2_distill.methods import (  # noqa: F401  (registration)
    annealing_kd, distilbert, kd, lm, minilm, minilmv2, pd, pkd, tinybert)
from kdpipe.stage2_distill.methods.base import METHODS, Batch, Context, Method, Needs, StudentOutput  # noqa: F401

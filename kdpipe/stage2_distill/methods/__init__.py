"""Distillation methods: one file each, registered by name (see base.py)."""

from kdpipe.stage2_distill.methods import (  # noqa: F401  (registration)
    alp_kd, annealing_kd, ckd, diito, distilbert, kd, lm, lrc_bert, mgskd, minilm, minilmv2, mobilebert, pd, pkd, rail_kd, sid,
    theseus, tinybert, universal_kd)
from kdpipe.stage2_distill.methods.base import METHODS, Batch, Context, Method, Needs, StudentOutput  # noqa: F401

"""Distillation methods: one file each, registered by name (see base.py)."""

from kdpipe.stage2_distill.methods import (  # noqa: F401  (registration)
    alp_kd, annealing_kd, ckd, dgkd, diito, distilbert, kd, lm, lrc_bert, mgskd, minilm, minilmv2, mobilebert, mt_bert, pd,
    pkd, rail_kd, rl_kd, sid, theseus, tinybert, tmkd, uncertainty, universal_kd)
from kdpipe.stage2_distill.methods.base import METHODS, Batch, Context, Method, Needs, StudentOutput  # noqa: F401

"""RL-KD: Yuan, Shou, Pei, Lin, Gong, Fu, Jiang 2021, "Reinforced Multi-Teacher Selection for
Knowledge Distillation".

A policy picks, per example, which teachers the student learns from. Its state describes each teacher
on the example, from the cache: its NLL on the data (see mt_bert), its mean top-1 probability and top-k
mass (how sure it is), and its mean-pooled last cached hidden state (when the cache holds one). The
policy is pi(a_i = 1 | s) = sigmoid(W s + b)_i; selected teachers' soft losses are averaged per
example. The policy is trained by REINFORCE: the reward of the previous step's selections is the
student's improvement, prev LM loss - current LM loss (both on their batches, against a running
baseline), so selections that preceded progress become more likely. Actions are drawn with a seeded
generator. The policy's history (last state, action, loss) is not checkpointed: a resumed run
restarts it.
"""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.stage2_distill.features import pool
from kdpipe.stage2_distill.losses import lm_loss, masked_mean, teacher_label_nll, teacher_tail
from kdpipe.stage2_distill.methods.base import register
from kdpipe.stage2_distill.methods.multi import MultiTeacherMethod


@register
class RLKD(MultiTeacherMethod):
    name = "rl_kd"
    paper = "Yuan et al. 2021"
    adapted = "per-example state from cached top-k statistics and pooled hidden states; reward = LM-loss improvement"
    defaults = {**MultiTeacherMethod.defaults, "seed": 0, "baseline_decay": 0.9}

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        # the last hidden layer each cache holds (if any) describes the example
        self.state_layers = [max(h) if h else None for h in ctx.teacher_hidden]
        width = sum(3 + (t.hidden_size if layer is not None else 0)
                    for t, layer in zip(ctx.teachers, self.state_layers))
        self.policy = nn.Linear(width, len(ctx.teachers))
        self._last: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._baseline: float | None = None

    def teacher_needs(self, i):
        needs = super().teacher_needs(i)
        needs.topk = True  # the state reads each teacher's top-k statistics
        needs.hidden = [self.state_layers[i]] if self.state_layers[i] is not None else []
        return needs

    def state(self, batch) -> torch.Tensor:
        parts = []
        for i, layer in enumerate(self.state_layers):
            b = batch.teacher(i)
            top1 = masked_mean(b.topk_logprobs[..., 0].exp(), b.mask, per_sequence=True)
            tail = None if b.logtail is None else b.logtail[..., 0]
            mass = masked_mean(1 - teacher_tail(b.topk_logprobs, tail).exp(), b.mask, per_sequence=True)
            nll = teacher_label_nll(b.topk_ids, b.topk_logprobs, b.input_ids, b.mask, tail)
            parts.append(torch.stack([nll, top1, mass], -1))
            if layer is not None:
                parts.append(pool(b.hidden[layer].float(), b.mask, "mean"))
        return torch.cat(parts, -1)

    def log_prob(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        logits = self.policy(state)
        return -nn.functional.binary_cross_entropy_with_logits(logits, action, reduction="none").sum(-1)

    def loss(self, batch, out, step):
        state = self.state(batch).detach()
        with torch.no_grad():
            probs = torch.sigmoid(self.policy(state))
            g = torch.Generator(device="cpu").manual_seed(int(self.params["seed"]) * 1_000_003 + step)
            action = (torch.rand(probs.shape, generator=g).to(probs.device) < probs).float()
        kd = torch.stack([self.kd(batch, out, i) for i in range(self.num_teachers)], -1)  # [B, n]
        soft = ((kd * action).sum(-1) / action.sum(-1).clamp_min(1)).mean()
        current = float(lm_loss(out.logits.detach(), batch.input_ids, batch.mask))
        policy = soft.new_zeros(())
        if self._last is not None:
            last_state, last_action, last_loss = self._last
            reward = last_loss - current
            decay = float(self.params["baseline_decay"])
            self._baseline = reward if self._baseline is None else decay * self._baseline + (1 - decay) * reward
            policy = -(reward - self._baseline) * self.log_prob(last_state, last_action).mean()
        self._last = (state, action, current)
        return {"kd": soft, "policy": policy}

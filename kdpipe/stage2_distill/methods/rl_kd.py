"""RL-KD: Yuan, Shou, Pei, Lin, Gong, Fu, Jiang 2021, "Reinforced Multi-Teacher Selection for
Knowledge Distillation".

A policy picks, per example, which teachers the student learns from. Its state describes each teacher
on the example, from the cache: its NLL on the data (see mt_bert), its mean top-1 probability and top-k
mass (how sure it is), and its mean-pooled last cached hidden state (when the cache holds one). The
policy is pi(a_i = 1 | s) = sigmoid(W s + b)_i; selected teachers' soft losses are averaged per
example. The policy is trained by REINFORCE, per example: the reward of a selection is what the update
it took part in did to that very example, its LM loss before the update minus its LM loss after (a
no-grad re-forward of the example at the next step, once the optimizer has stepped; with --grad-accum
every micro-batch of the step is paired with its own examples), against a running baseline. Actions
are drawn with a generator seeded by step and micro-batch. The pending selections are not
checkpointed: a resumed run starts their history afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    uncompared = ("policy",)
    topk_only = True

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        # the last hidden layer each cache holds (if any) describes the example
        self.state_layers = [max(h) if h else None for h in ctx.teacher_hidden]
        width = sum(3 + (t.hidden_size if layer is not None else 0)
                    for t, layer in zip(ctx.teachers, self.state_layers))
        self.policy = nn.Linear(width, len(ctx.teachers))
        self._pending: list[Pending] = []
        self._baseline: float | None = None
        self._step, self._micro = -1, 0
        self.last_reward: torch.Tensor | None = None

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
                parts.append(pool(b.hidden[layer].float(), b.layer_mask, "mean"))
        return torch.cat(parts, -1)

    def log_prob(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        logits = self.policy(state)
        return -nn.functional.binary_cross_entropy_with_logits(logits, action, reduction="none").sum(-1)

    def loss(self, batch, out, step):
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        state = self.state(batch).detach()
        with torch.no_grad():
            probs = torch.sigmoid(self.policy(state))
            seed = (int(self.params["seed"]) * 1_000_003 + step) * 1_009 + self._micro
            action = (torch.rand(probs.shape, generator=torch.Generator().manual_seed(seed)).to(probs.device)
                      < probs).float()
        kd = torch.stack([self.kd(batch, out, i) for i in range(self.num_teachers)], -1)  # [B, n]
        soft = ((kd * action).sum(-1) / action.sum(-1).clamp_min(1)).mean()
        before = lm_loss(out.logits.detach(), batch.input_ids, batch.targets, per_sequence=True)
        ready = [p for p in self._pending if p.step < step]  # selections whose update has happened since
        policy = soft.new_zeros(())
        if ready and out.run is not None:
            policy = sum(self.reinforce(p, out.run) for p in ready) / len(ready)
        self._pending = [p for p in self._pending if p.step >= step] + [
            Pending(step, state, action, batch.input_ids, batch.mask, batch.targets, before)]
        return {"kd": soft, "policy": policy}

    def reinforce(self, p: "Pending", run) -> torch.Tensor:
        """-(reward - baseline) * log pi(action | state), per example, for selections made before the update."""
        with torch.no_grad():
            logits, _ = run(p.input_ids, p.mask, {})
            reward = p.before - lm_loss(logits, p.input_ids, p.targets, per_sequence=True)  # [B]
        decay = float(self.params["baseline_decay"])
        mean = float(reward.mean())
        self._baseline = mean if self._baseline is None else decay * self._baseline + (1 - decay) * mean
        self.last_reward = reward
        return -((reward - self._baseline) * self.log_prob(p.state, p.action)).mean()


@dataclass
class Pending:
    """A micro-batch's selections, kept until the optimizer step they took part in has happened."""
    step: int
    state: torch.Tensor
    action: torch.Tensor
    input_ids: torch.Tensor
    mask: torch.Tensor  # real tokens (the forward's attention)
    targets: torch.Tensor  # learned tokens (the reward's LM loss)
    before: torch.Tensor  # [B] the student's LM loss on these examples before the update

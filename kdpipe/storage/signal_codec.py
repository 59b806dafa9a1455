"""Compressed hidden states and attention factors (`signals.hidden_codec` / `attention_codec` = "int8").

Hidden states. A real decoder's channels differ by orders of magnitude (SmolLM2-135M: |h| up to ~23,000 on
a few channels, ~1 on the rest), so one scale per vector would round every ordinary channel to zero. Each
layer is coded in its own channel-scaled space, y = (h - center) / scale, with center and scale (per
channel: mean and standard deviation) from the calibration tokens: the space the hidden-state methods
compare states in by default (Method.hidden, "channel"). There, optionally, a fixed orthonormal projection
to r dimensions, the top-r principal directions of the calibration tokens (`hidden_rank`), and then 8 bits
per coordinate with one float16 step per vector: z -> round(z / step), step = max|z| / 127. Decoding gives
h' = center + scale * (B z'), B the [H, r] basis (the identity when r = H): the loss a method computes on h'
is its loss on the states projected by B B^T, up to quantization. Per coordinate the quantization error is
at most step / 2 = max|z| / 254 (plus float16's rounding of the step); what a layer's projection leaves out
is measured on the calibration tokens and recorded (`signals.hidden_error`).

Attention factors (post-RoPE Q, K, V): 8 bits per coordinate with one float16 step per (token, head) vector;
optionally (`attention_rank` r < head_dim, FactorCodec) first projected per head to r dimensions around the
calibration mean. What TinyBERT matches are the scores q.k, so Q and K are projected to keep them, not
themselves: K's error is measured in the metric of the queries that read it (E[q q^T] of its query heads),
Q's in that of its key head (E[k k^T]), i.e. the top-r principal directions of W^(1/2) (x - mean) for that W.
On SmolLM2-135M at r = 16 of 64 this leaves 3-5% of the held-out scores' squared error against 14-18% for
plain principal directions (bench/RESULTS.md); V, which no score reads, keeps its plain principal directions.

Encoding runs on the teacher's device in float32 (a projection of [B*T, H] by [H, r]); decoding is the
reader's, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LEVELS = 127
FLOOR = 1e-6  # of the mean variance: a channel that never moves is not blown up


def quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., d] float -> (int8 [..., d], float16 step [...]); |z - q * step| <= step / 2 per coordinate."""
    step = (z.abs().amax(-1) / LEVELS).to(torch.float16)
    divide = step.float()
    divide = torch.where(divide > 0, divide, torch.ones_like(divide))
    q = torch.round(z / divide.unsqueeze(-1)).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return q, step


def dequantize(q: np.ndarray | torch.Tensor, step: np.ndarray | torch.Tensor) -> torch.Tensor:
    q, step = torch.as_tensor(q), torch.as_tensor(step)
    return q.float() * step.float().unsqueeze(-1)


@dataclass
class HiddenCodec:
    """One hidden layer's code: per-channel center and scale [H], and a basis [H, r] (None: all channels)."""
    center: torch.Tensor
    scale: torch.Tensor
    basis: torch.Tensor | None = None

    @classmethod
    def fit(cls, states: torch.Tensor, rank: int = 0) -> tuple["HiddenCodec", float]:
        """From calibration states [n, H]: the code, and the share of the channel-scaled variance its projection
        leaves out (0 without one). Computed in float64."""
        x = states.double()
        center = x.mean(0)
        var = (x - center).pow(2).mean(0)
        scale = (var + FLOOR * var.mean()).sqrt()
        basis, left_out = None, 0.0
        if 0 < rank < x.shape[1]:
            y = (x - center) / scale
            values, vectors = torch.linalg.eigh(y.T @ y / len(y))  # ascending
            basis = vectors[:, -rank:].flip(-1)
            left_out = float(1 - values[-rank:].sum() / values.sum().clamp_min(1e-300))
        return cls(center.float(), scale.float(), None if basis is None else basis.float().contiguous()), left_out

    def to(self, device) -> "HiddenCodec":
        return HiddenCodec(self.center.to(device), self.scale.to(device),
                           None if self.basis is None else self.basis.to(device))

    @property
    def width(self) -> int:
        return len(self.center) if self.basis is None else self.basis.shape[1]

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., H] -> (int8 [..., r], float16 step [...])."""
        z = (h.float() - self.center) / self.scale
        if self.basis is not None:
            z = z @ self.basis
        return quantize(z)

    def decode(self, q, step) -> torch.Tensor:
        """(int8 [..., r], float16 [...]) -> float32 [..., H]."""
        z = dequantize(q, step)
        if self.basis is not None:
            z = z @ self.basis.T
        return z * self.scale + self.center

    def arrays(self) -> dict[str, np.ndarray]:
        """What the cache stores of it, by array suffix."""
        out = {"affine": torch.stack([self.center, self.scale]).cpu().numpy()}
        if self.basis is not None:
            out["basis"] = self.basis.cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, affine: np.ndarray, basis: np.ndarray | None) -> "HiddenCodec":
        affine = torch.from_numpy(np.asarray(affine, np.float32))
        return cls(affine[0], affine[1], None if basis is None else torch.from_numpy(np.asarray(basis, np.float32)))

    def relative_error(self, states: torch.Tensor) -> float:
        """||y' - y||^2 / ||y||^2 in the channel-scaled space, over states [n, H]."""
        y = (states.float() - self.center) / self.scale
        back = (self.decode(*self.encode(states)) - self.center) / self.scale
        return float((back - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def factor_error(x: torch.Tensor) -> float:
    """||x' - x||^2 / ||x||^2 of int8 factors x [..., d]."""
    back = dequantize(*quantize(x.float()))
    return float((back - x.float()).pow(2).sum() / x.float().pow(2).sum().clamp_min(1e-30))


RIDGE = 1e-2  # of the metric's mean eigenvalue: directions no query reads still count a little


def _sqrt_psd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W^(1/2) and W^(-1/2) of a symmetric positive definite W (float64)."""
    values, vectors = torch.linalg.eigh(w)
    values = values.clamp_min(1e-300)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


@dataclass
class FactorCodec:
    """One attention layer's Q, K or V code: per head a center [h, d], and an encoder and decoder [h, d, r] with
    decoder^T encoder = I, so decode(encode(x)) = center + P (x - center), P = decoder encoder^T a projection."""
    center: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, rank: int, metric: torch.Tensor | None = None) -> "FactorCodec":
        """From calibration vectors x [n, h, d]; `metric` [h, d, d]: per head, the W that the error is measured in
        (None: the identity, plain principal directions). Computed in float64."""
        x = x.double()
        center = x.mean(0)
        enc, dec = [], []
        for head in range(x.shape[1]):
            y = x[:, head] - center[head]
            eye = torch.eye(x.shape[2], dtype=x.dtype, device=x.device)
            w = eye if metric is None else metric[head].to(eye)
            w = w + RIDGE * torch.diagonal(w).mean().clamp_min(1e-30) * eye
            root, inverse_root = _sqrt_psd(w)
            _, vectors = torch.linalg.eigh(root @ (y.T @ y) @ root)  # ascending
            top = vectors[:, -rank:].flip(-1)
            enc.append(root @ top)
            dec.append(inverse_root @ top)
        return cls(center.float(), torch.stack(enc).float(), torch.stack(dec).float())

    @property
    def rank(self) -> int:
        return self.decoder.shape[-1]

    def to(self, device) -> "FactorCodec":
        return FactorCodec(self.center.to(device), self.encoder.to(device), self.decoder.to(device))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, h, T, d] -> (int8 [B, h, T, r], float16 step [B, h, T])."""
        z = torch.einsum("bhtd,hdr->bhtr", x.float() - self.center[:, None], self.encoder)
        return quantize(z)

    def decode(self, q, step) -> torch.Tensor:
        """(int8 [B, h, T, r], float16 [B, h, T]) -> float32 [B, h, T, d]."""
        z = dequantize(q, step)
        return torch.einsum("bhtr,hdr->bhtd", z, self.decoder) + self.center[:, None]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"center": self.center.cpu().numpy(), "encoder": self.encoder.cpu().numpy(),
                "decoder": self.decoder.cpu().numpy()}

    @classmethod
    def from_arrays(cls, center: np.ndarray, encoder: np.ndarray, decoder: np.ndarray) -> "FactorCodec":
        return cls(*(torch.from_numpy(np.asarray(a, np.float32)) for a in (center, encoder, decoder)))

    def relative_error(self, x: torch.Tensor) -> float:
        """||x' - x||^2 / ||x||^2 over vectors [B, h, T, d]."""
        back = self.decode(*self.encode(x))
        return float((back - x.float()).pow(2).sum() / x.float().pow(2).sum().clamp_min(1e-30))


def second_moments(x: torch.Tensor) -> torch.Tensor:
    """E[x x^T] per head of vectors [n, h, d], float64 [h, d, d]."""
    x = x.double()
    return torch.einsum("nhd,nhe->hde", x, x) / max(len(x), 1)


def score_metrics(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The metrics that keep the scores q.k: for each query head its key head's E[k k^T], for each key head the sum
    of E[q q^T] over the query heads that read it (grouped-query: heads h*g .. h*g+g-1 read key head h)."""
    mq, mk = second_moments(q), second_moments(k)
    group = q.shape[1] // k.shape[1]
    return mk.repeat_interleave(group, 0), mq.view(k.shape[1], group, *mq.shape[1:]).sum(1)

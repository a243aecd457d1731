"""Model FLOPs of the MAGNeT LM, for MFU (training) and throughput reports.

Notation: B batch, T code frames, L text positions (the padded text length the step actually runs), D model dim,
F = hidden_scale·D, N layers, K codebooks, V = card, Dt text-encoder dim.

Training FLOPs per step = 6 · (T · P_frame + L · P_text) · B  +  3 · attention
  P_frame = N · (4D² + 2D² + 2DF) + K·D·V   matmul weights applied at every frame: self-attention q/k/v/out,
                                             cross-attention q/out, feed-forward, the K output heads
  P_text  = Dt·D + N · 2D²                  matmul weights applied at every text position: the condition
                                             projection and the cross-attention k/v
  attention (forward) = B · N · (4·T²·D + 4·T·L·D)   scores and weighted values of self-attention over all T×T
                                             pairs (MAGNeT is non-causal: no halving; the band of stages >= 1 is
                                             computed densely) and of cross-attention over T×L.
i.e. the usual 6 · N_params · tokens + attention, with N_params split by the positions each weight sees. The
factor 6 (and 3 for attention) is forward 2 + backward 4 per multiply-add. Embedding lookups, norms, biases and
elementwise work are not counted; the frozen T5 encoder is not part of the trained model's FLOPs.

Public API:
  matmul_params(config) -> (P_frame, P_text)
  forward_flops(config, *, batch, seq_len, cond_len) -> float
  train_flops(config, *, batch, seq_len, cond_len) -> float   (= 3 × forward_flops)
"""
from __future__ import annotations

from magnet_jax.models.lm import LMConfig


def matmul_params(config: LMConfig) -> tuple[int, int]:
    """(weights applied per code frame, weights applied per text position) of the LM's matmuls."""
    d = config.dim
    per_layer_frame = 4 * d * d + 2 * d * d + 2 * d * config.ffn_dim
    per_frame = config.num_layers * per_layer_frame + config.n_q * d * config.card
    per_text = config.cond_dim * d + config.num_layers * 2 * d * d
    return per_frame, per_text


def forward_flops(config: LMConfig, *, batch: int, seq_len: int, cond_len: int) -> float:
    """FLOPs of one LM forward pass over `[batch, K, seq_len]` codes with `cond_len` text positions."""
    per_frame, per_text = matmul_params(config)
    dense = 2.0 * batch * (seq_len * per_frame + cond_len * per_text)
    attention = 4.0 * batch * config.num_layers * config.dim * (seq_len * seq_len + seq_len * cond_len)
    return dense + attention


def train_flops(config: LMConfig, *, batch: int, seq_len: int, cond_len: int) -> float:
    """FLOPs of one training step (forward + backward) over a global batch of `batch` sequences."""
    return 3.0 * forward_flops(config, batch=batch, seq_len=seq_len, cond_len=cond_len)

"""Model FLOPs of the MAGNeT LM, for MFU (training) and throughput reports (docs/design.md §5.5).

Training FLOPs per step = 6 · (T · P_frame + L · P_text) · B + 3 · attention: the matmul weights split by the
positions each one sees (P_frame per code frame, P_text per text position) and self/cross-attention counted densely;
embeddings, norms and the frozen T5 are not counted.
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


def decode_pass_flops(config: LMConfig, *, batch: int, seq_len: int, cond_len: int) -> float:
    """FLOPs of one guided MAGNeT decoding pass for `batch` descriptions: `forward_flops` over the 2·batch CFG rows
    with one codebook's head applied to the `batch` guided states (`LanguageModel(head=..., guidance=...)`), without
    the null rows' cross-attention (exactly zero, skipped) and without the text's cross-attention keys/values
    (computed once per generation); attention counted dense."""
    d = config.dim
    rows = 2 * batch
    heads_saved = 2.0 * seq_len * d * config.card * (rows * config.n_q - batch)
    text_kv = 2.0 * rows * cond_len * (config.cond_dim * d + config.num_layers * 2 * d * d)
    null_cross = config.num_layers * (2.0 * seq_len * 2 * d * d + 4.0 * d * seq_len * cond_len)
    return (
        forward_flops(config, batch=rows, seq_len=seq_len, cond_len=cond_len)
        - heads_saved
        - text_kv
        - batch * null_cross
    )


def train_flops(config: LMConfig, *, batch: int, seq_len: int, cond_len: int) -> float:
    """FLOPs of one training step (forward + backward) over a global batch of `batch` sequences."""
    return 3.0 * forward_flops(config, batch=batch, seq_len=seq_len, cond_len=cond_len)

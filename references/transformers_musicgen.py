"""transformers' MusicGen decoder as a reference: the tiny configuration the parity and import tests share."""

from __future__ import annotations


def musicgen_decoder_config():
    """A tiny `MusicgenDecoderConfig`: 4 codebooks of 32 codes, width 32, 2 layers of 4 heads."""
    from transformers import MusicgenDecoderConfig

    return MusicgenDecoderConfig(
        vocab_size=32,
        num_codebooks=4,
        hidden_size=32,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=32,
        bos_token_id=32,
    )

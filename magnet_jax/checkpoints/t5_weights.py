"""T5 encoder weights in the transformers format (`config.json` + `model.safetensors`, read with NumPy)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.checkpoints.weights import check_state_dict, load_safetensors
from magnet_jax.fileio import WeightsError, resolve_file
from magnet_jax.models.t5 import T5Config


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> T5Config:
    """The encoder architecture of a transformers T5 `config.json` dict."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise WeightsError(f"T5 config: feed_forward_proj={proj!r} is not supported (relu or gated-gelu)")
    return T5Config(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=proj,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        dtype=dtype,
    )


def _hf_names(c: T5Config) -> dict[str, tuple[str, ...]]:
    """transformers key -> our param path."""
    names = {
        "encoder.final_layer_norm.weight": ("final_norm", "scale"),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": ("relpos_bias",),
    }
    for i in range(c.num_layers):
        pre, blk = f"encoder.block.{i}.layer.", f"block_{i}"
        names[pre + "0.layer_norm.weight"] = (blk, "attn_norm", "scale")
        names[pre + "1.layer_norm.weight"] = (blk, "ffn_norm", "scale")
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            names[pre + f"0.SelfAttention.{theirs}.weight"] = (blk, ours, "kernel")
        for w in ("wi_0", "wi_1", "wo") if c.gated else ("wi", "wo"):
            names[pre + f"1.DenseReluDense.{w}.weight"] = (blk, w, "kernel")
    return names


def params_from_hf(state: Mapping[str, np.ndarray], c: T5Config, *, source: str) -> dict:
    """transformers T5 (encoder) state dict -> our params; strict about encoder keys."""
    state = dict(state)
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    names = _hf_names(c)
    h, dkv, d = c.num_heads, c.d_kv, c.d_model
    expected = {k: _hf_shape(path, c) for k, path in names.items()}
    expected["encoder.embed_tokens.weight"] = (c.vocab_size, d)
    ignore = [k for k in state if k.startswith(("decoder.", "lm_head.")) or k == "shared.weight"]
    check_state_dict(state, expected, source=source, ignore=ignore)
    params: dict = {"embedding": {"embedding": state["encoder.embed_tokens.weight"]}}
    for key, path in names.items():
        w = state[key]
        name = path[-2] if len(path) > 1 else path[0]
        if name in ("query", "key", "value"):
            w = w.T.reshape(d, h, dkv)
        elif name == "out":
            w = w.T.reshape(h, dkv, d)
        elif name in ("wi", "wi_0", "wi_1", "wo"):
            w = w.T
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = w
    dtype = jnp.dtype(c.dtype)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32), dtype), params)


def _hf_shape(path, c: T5Config):
    name = path[-2] if len(path) > 1 else path[0]
    d = c.d_model
    return {
        "relpos_bias": (c.relative_attention_num_buckets, c.num_heads),
        "final_norm": (d,),
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "query": (c.num_heads * c.d_kv, d),
        "key": (c.num_heads * c.d_kv, d),
        "value": (c.num_heads * c.d_kv, d),
        "out": (d, c.num_heads * c.d_kv),
        "wi": (c.d_ff, d),
        "wi_0": (c.d_ff, d),
        "wi_1": (c.d_ff, d),
        "wo": (d, c.d_ff),
    }[name]


def load_t5(source: str, *, dtype: str = "float32") -> tuple[T5Config, dict]:
    """T5 encoder config and params from a hub id (`t5-base`, `google/flan-t5-base`) or a local directory."""
    what = f"T5 text encoder {source!r}"
    config_path = resolve_file(source, "config.json", what=what)
    try:
        hf = json.loads(Path(config_path).read_text())
        config = config_from_hf(hf, dtype)
    except (ValueError, KeyError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{what}: {config_path} is not a T5 config.json ({type(e).__name__}: {e})") from e
    weights = resolve_file(source, "model.safetensors", what=what)
    return config, params_from_hf(load_safetensors(weights, what=what), config, source=str(weights))


def write_random_t5(
    directory: str | Path,
    *,
    corpus: list[str],
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 8,
    d_ff: int = 64,
    feed_forward_proj: str = "relu",
    vocab_size: int = 128,
    tokenizer_type: str = "unigram",
    seed: int = 0,
) -> Path:
    """Writes a random T5 encoder + a sentencepiece tokenizer trained on `corpus`, in the transformers layout.

    Gives tests and the quickstart a local text encoder with no download (`config.json`, `model.safetensors`,
    `spiece.model`, `tokenizer_config.json`); `load_t5(directory)` and the conditioner's tokenizer read it.
    `tokenizer_type`: the sentencepiece model type (`unigram` like the real T5's, or `bpe`, which keeps a small
    corpus's words whole where a small unigram vocabulary cuts them into letters).
    """
    import sentencepiece as spm
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=tokenizer_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (directory / "spiece.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = sp.get_piece_size()
    hf_config = {
        "model_type": "t5",
        "architectures": ["T5EncoderModel"],
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": feed_forward_proj,
        "layer_norm_epsilon": 1e-6,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "extra_ids": 0,
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 512,
            },
            indent=2,
        )
    )
    config = config_from_hf(hf_config)
    rng = np.random.default_rng(seed)
    state = {"shared.weight": rng.standard_normal((vocab, d_model)).astype(np.float32)}
    for key, path in _hf_names(config).items():
        shape = _hf_shape(path, config)
        fan = shape[-1]
        state[key] = (
            np.ones(shape, np.float32)
            if path[-1] == "scale"
            else rng.standard_normal(shape).astype(np.float32) * fan**-0.5
        )
    save_file(state, str(directory / "model.safetensors"))
    return directory

"""audiocraft's MAGNeT / MusicGen language models with the released flags, on random or given weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from magnet_jax.models.lm import LMConfig
from references import audiocraft_stubs

TINY = dict(dim=32, num_heads=4, num_layers=2, n_q=4, card=32, cond_dim=24)  # a tiny architecture for parity tests
_FUSER = {"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []}
_RELEASED_FLAGS = dict(
    hidden_scale=4,
    norm="layer_norm",
    norm_first=True,
    bias_proj=False,
    bias_ff=False,
    bias_attn=False,
    activation="gelu",
    cross_attention=True,
    positional_embedding="sin",
    memory_efficient=True,
    device="cpu",
    dtype=torch.float32,
)


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def audiocraft_lm(*, dim, num_heads, num_layers, n_q, card, cond_dim, causal=False, seed=0) -> torch.nn.Module:
    """audiocraft MAGNeT (or MusicGen with `causal`) LM with the released flags; the description conditioner is a
    bare `output_proj` (the T5 conditioner's only parameters); LayerNorms randomised so they are exercised too."""
    audiocraft_stubs.install()
    from audiocraft.models.lm import LMModel
    from audiocraft.models.lm_magnet import MagnetLMModel
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider, ParallelPatternProvider
    from audiocraft.modules.conditioners import BaseConditioner, ConditionFuser, ConditioningProvider
    from audiocraft.modules.transformer import set_efficient_attention_backend

    set_efficient_attention_backend("xformers")  # as audiocraft's MAGNeT loader; never the 'torch' backend
    torch.manual_seed(seed)
    common = dict(
        condition_provider=ConditioningProvider({"description": BaseConditioner(cond_dim, dim)}),
        fuser=ConditionFuser(_FUSER),
        n_q=n_q,
        card=card,
        dim=dim,
        num_heads=num_heads,
        num_layers=num_layers,
        causal=causal,
        weight_init="gaussian",
        depthwise_init="current",
        zero_bias_init=True,
        **_RELEASED_FLAGS,
    )
    if causal:
        lm = LMModel(pattern_provider=DelayedPatternProvider(n_q=n_q, delays=list(range(n_q))), **common)
    else:
        lm = MagnetLMModel(
            pattern_provider=ParallelPatternProvider(n_q=n_q, empty_initial=-1),
            subcodes_context=5,
            compression_model_framerate=50,
            segment_duration=1,
            span_len=3,
            **common,
        )
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    return lm.eval()


def token_conditioned_magnet(
    config: LMConfig,
    tokenize: Callable[[list], tuple[np.ndarray, np.ndarray]],
    *,
    n_bins: int,
    frame_rate: int = 50,
    segment_duration: int = 1,
    seed: int = 0,
):
    """audiocraft's `MagnetLMModel` (default init) whose description conditioner is a lookup table over token ids:
    a T5-shaped condition without T5, for whole-generation comparisons.

    `tokenize(descriptions) -> (ids [B, L], mask [B, L])` int arrays (None = the null condition). Returns the model
    and the table `[n_bins, cond_dim]` (what our decoder gets as T5 states: `table[ids]`).
    """
    audiocraft_stubs.install()
    import audiocraft.modules.transformer as transformer
    from audiocraft.models.lm_magnet import MagnetLMModel
    from audiocraft.modules.codebooks_patterns import ParallelPatternProvider
    from audiocraft.modules.conditioners import ConditionFuser, ConditioningProvider, LUTConditioner

    class TokensConditioner(LUTConditioner):
        def tokenize(self, texts):
            ids, mask = tokenize(texts)
            return torch.from_numpy(np.asarray(ids, np.int64)), torch.from_numpy(np.asarray(mask)).int()

    transformer.set_efficient_attention_backend("xformers")  # band mask kept at stages >= 1 (the stub's SDPA)
    torch.manual_seed(seed)
    c = config
    provider = ConditioningProvider(
        {"description": TokensConditioner(n_bins=n_bins, dim=c.cond_dim, output_dim=c.dim, tokenizer="noop")}
    )
    lm = MagnetLMModel(
        pattern_provider=ParallelPatternProvider(n_q=c.n_q, empty_initial=-1),
        condition_provider=provider,
        fuser=ConditionFuser(_FUSER),
        n_q=c.n_q,
        card=c.card,
        dim=c.dim,
        num_heads=c.num_heads,
        num_layers=c.num_layers,
        causal=False,
        dropout=0.0,
        subcodes_context=c.subcodes_context,
        compression_model_framerate=frame_rate,
        segment_duration=segment_duration,
        span_len=3,
        **{**_RELEASED_FLAGS, "hidden_scale": c.hidden_scale},
    ).eval()
    return lm, provider.conditioners["description"].embed.weight.detach().numpy()


def lm_state(lm: torch.nn.Module) -> dict[str, np.ndarray]:
    """The LM's state dict without a lookup-table conditioner's table (which is not an LM parameter)."""
    return {k: v for k, v in state_dict_numpy(lm).items() if not k.endswith("description.embed.weight")}


def magnet_generate(lm, descriptions: list, decode_params, *, length: int, prompt: np.ndarray | None = None):
    """audiocraft's `MagnetLMModel.generate` with the settings of a magnet_jax `DecodeParams` (top-k off; greedy
    when `use_sampling` is False). Returns `[B, K, T]` codes as a torch tensor."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    dp = decode_params
    conditions = [ConditioningAttributes(text={"description": d}) for d in descriptions]
    with torch.no_grad():
        return lm.generate(
            prompt=None if prompt is None else torch.from_numpy(prompt),
            conditions=conditions,
            max_gen_len=length,
            use_sampling=dp.use_sampling,
            temp=dp.temperature,
            top_k=0,
            top_p=dp.top_p,
            max_cfg_coef=dp.max_cfg,
            min_cfg_coef=dp.min_cfg,
            decoding_steps=list(dp.decoding_steps),
            span_arrangement=dp.span_arrangement,
            span_scoring=dp.span_scoring,
        )

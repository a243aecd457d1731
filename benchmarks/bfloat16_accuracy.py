"""What bfloat16 generation changes: logits of the bfloat16 LM (params cast once, float32 softmax, logits and
sampling) against the float32 LM on the same weights, and the agreement of greedy decoding.

A randomly initialised model (the reference's init, `init_params`) of each size, random T5-like conditioning:
- per stage (0 = full attention, >= 1 = band) the logits of one LM pass on half-masked random codes: max |error|,
  error relative to the logits' spread (std), and the fraction of positions whose argmax agrees;
- greedy MAGNeT decoding (`use_sampling=False`, CFG, the default schedule) of `duration` seconds in both dtypes:
  the fraction of equal tokens per codebook. Greedy decoding is a chaotic process (one flipped argmax changes
  every later step), so this is a lower bound of how close the two are.

  python benchmarks/bfloat16_accuracy.py                       # 512x8, 10 s, steps 20,10,10,10
  python benchmarks/bfloat16_accuracy.py --sizes=256x4 --steps=4,2,2,2

Writes `benchmarks/results/bfloat16_accuracy.json`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import lm_config, machine

from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, cast_params, init_params

_SIZES = flags.DEFINE_list("sizes", ["512x8"], "models: <dim>x<layers> and/or presets")
_STEPS = flags.DEFINE_list("steps", ["20", "10", "10", "10"], "decoding steps per codebook")
_DURATION = flags.DEFINE_float("duration", 10.0, "seconds of audio (50 frames per second)")
_SEEDS = flags.DEFINE_integer("seeds", 2, "random models / conditions per size")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bfloat16_accuracy", "output path without extension")


def models(size: str, seed: int):
    """(float32 model, params), (bfloat16 model, params cast once) of one random init."""
    config = lm_config(size)
    f32 = LanguageModel(config)
    params = jax.jit(lambda k: nn.meta.unbox(init_params(f32, k)))(jax.random.key(seed))
    bf16 = LanguageModel(lm_config(size, dtype="bfloat16", param_dtype="bfloat16"))
    return (f32, params), (bf16, cast_params(params, "bfloat16"))


def logit_errors(pair, cond: TextConditioning, length: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    config = pair[0][0].config
    codes = rng.integers(0, config.card, (cond.states.shape[0], config.n_q, length))
    codes = jnp.asarray(np.where(rng.random(codes.shape) < 0.5, config.mask_id, codes), jnp.int32)

    def logits(model, params, stage):
        condition = model.apply({"params": params}, cond.states, cond.mask, method=model.project_condition)
        return model.apply({"params": params}, codes, condition, None, stage, head=stage)

    fns = [(jax.jit(functools.partial(logits, model)), params) for model, params in pair]  # the stage traced
    rows = []
    for stage in range(config.n_q):
        high, low = (np.asarray(fn(params, jnp.int32(stage))) for fn, params in fns)
        err = np.abs(low - high)
        rows.append(
            {
                "stage": stage,
                "max_abs_error": float(err.max()),
                "mean_abs_error": float(err.mean()),
                "logit_std": float(high.std()),
                "relative_max_error": float(err.max() / high.std()),
                "argmax_agreement": float((low.argmax(-1) == high.argmax(-1)).mean()),
            }
        )
    return rows


def greedy_agreement(pair, cond: TextConditioning, length: int, steps) -> list[float]:
    dp = DecodeParams(decoding_steps=tuple(steps), use_sampling=False)
    codes = [np.asarray(generate_codes(m, p, cond, jax.random.key(0), dp, length=length)) for m, p in pair]
    return [float(v) for v in (codes[0] == codes[1]).mean(axis=(0, 2))]


def main(argv):
    del argv
    steps = [int(s) for s in _STEPS.value]
    length = int(_DURATION.value * 50)
    results = []
    for size in _SIZES.value:
        for seed in range(_SEEDS.value):
            pair = models(size, seed)
            config = pair[0][0].config
            key = jax.random.key(100 + seed)
            cond = TextConditioning(jax.random.normal(key, (2, 16, config.cond_dim)), jnp.ones((2, 16), jnp.int32))
            errors = logit_errors(pair, cond, length, seed)
            agreement = greedy_agreement(pair, cond, length, steps)
            results.append({"size": size, "seed": seed, "logits": errors, "greedy_token_agreement": agreement})
            for e in errors:
                print(
                    f"{size} seed {seed} stage {e['stage']}: max |err| {e['max_abs_error']:.4f} "
                    f"({e['relative_max_error']:.3f} std), argmax agreement {e['argmax_agreement']:.4f}",
                    flush=True,
                )
            print(f"{size} seed {seed}: greedy token agreement per codebook {[round(a, 4) for a in agreement]}")
    path = Path(_OUT.value).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "duration_s": _DURATION.value, "decoding_steps": steps}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

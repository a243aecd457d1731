"""One self-attention layer (q/k/v projections, attention, output projection) of the LM: ours vs torch SDPA.

Sides, all on the same weights and inputs `[B, T, D]`, timed alternately (min of `repeats` calls each):
- `ours_full`: `MultiHeadAttention` at stage 0 (head-major dense attention, docs/design.md §2.6);
- `ours_band`: the same program at stage 1 (the blocked ±`subcodes_context` band, stage traced);
- `core_full` / `core_band`: the attention alone (`attention.attend` on head-major q, k, v: scores, softmax,
  weighted values), stage 0 / 1 of one program: the part the stages differ in (the projections are the same work
  at every stage);
- `torch_core`: SDPA alone on the same q, k, v;
- `library_full`: the projections with `jax.nn.dot_product_attention` in its `[B, T, H, Dh]` layout (the previous
  implementation);
- `torch_full` / `torch_band`: `nn.functional.scaled_dot_product_attention` between torch linear projections, without
  a mask / with the boolean band mask (torch's CPU kernel has no band-skipping path).

  python benchmarks/attention_layer.py                      # dim 512, 8 heads, B=1, T = 498 and 1500, float32
  python benchmarks/attention_layer.py --dtype=bfloat16     # torch side in bfloat16 too
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python benchmarks/attention_layer.py --clock=cpu         # one thread each, CPU time (robust on a shared machine)

Writes `benchmarks/results/attention_layer.json`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import interleaved, machine

from magnet_jax.models.attention import MultiHeadAttention, StageMask, attend, stage_attention_mask

_DIM = flags.DEFINE_integer("dim", 512, "model dimension")
_HEADS = flags.DEFINE_integer("heads", 8, "attention heads")
_BATCH = flags.DEFINE_integer("batch", 1, "rows")
_LENGTHS = flags.DEFINE_list("lengths", ["498", "1500"], "sequence lengths (frames)")
_CONTEXT = flags.DEFINE_integer("subcodes_context", 5, "band half-width of stages >= 1")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of both sides")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls per side (alternating), min reported")
_CLOCK = flags.DEFINE_enum(
    "clock",
    "wall",
    ["wall", "cpu"],
    "wall time, or the process's CPU time with one thread per side (torch set to "
    "1 thread; XLA_FLAGS must make XLA single-threaded, see above)",
)
_OUT = flags.DEFINE_string("out", "benchmarks/results/attention_layer", "output path without extension")


def measure(length: int) -> dict:
    import torch

    dim, heads, batch, ctx = _DIM.value, _HEADS.value, _BATCH.value, _CONTEXT.value
    dtype = jnp.dtype(_DTYPE.value)
    layer = MultiHeadAttention(dim, heads, dtype, dtype)
    x = jax.random.normal(jax.random.key(0), (batch, length, dim), jnp.float32).astype(dtype)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x, mask=None))["params"]

    ours = jax.jit(lambda p, x, stage: layer.apply({"params": p}, x, mask=StageMask(stage, ctx)))

    def library(p, x):
        def heads_of(name):
            return jnp.einsum("btd,dhk->bthk", x, p[name]["kernel"])

        out = jax.nn.dot_product_attention(heads_of("query"), heads_of("key"), heads_of("value"))
        return jnp.einsum("bthk,hkd->btd", out, p["out"]["kernel"])

    library = jax.jit(library)
    q, k, v = (
        jnp.swapaxes(jnp.einsum("btd,dhk->bthk", x, params[name]["kernel"]), 1, 2) for name in ("query", "key", "value")
    )
    core = jax.jit(lambda q, k, v, stage: attend(q, k, v, StageMask(stage, ctx)))
    np_params = {k: np.asarray(v["kernel"], np.float32) for k, v in params.items()}
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    w_in = torch.from_numpy(np.concatenate([np_params[k].reshape(dim, dim).T for k in ("query", "key", "value")])).to(
        tdtype
    )
    w_out = torch.from_numpy(np_params["out"].reshape(dim, dim).T.copy()).to(tdtype)
    tx = torch.from_numpy(np.asarray(x, np.float32)).to(tdtype)
    band = torch.from_numpy(np.asarray(stage_attention_mask(length, 1, subcodes_context=ctx, causal=False))[0, 0])

    def torch_layer(mask):
        with torch.no_grad():
            q, k, v = torch.nn.functional.linear(tx, w_in).view(batch, length, 3, heads, dim // heads).unbind(2)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
            return torch.nn.functional.linear(out.transpose(1, 2).reshape(batch, length, dim), w_out)

    tq, tk, tv = (torch.from_numpy(np.asarray(a, np.float32)).to(tdtype) for a in (q, k, v))

    def torch_core():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    full, restricted = (np.asarray(ours(params, x, jnp.int32(s)), np.float32) for s in (0, 1))
    checks = {
        "library_vs_ours_full": float(np.abs(np.asarray(library(params, x), np.float32) - full).max()),
        "torch_vs_ours_full": float(np.abs(torch_layer(None).float().numpy() - full).max()),
        "torch_vs_ours_band": float(np.abs(torch_layer(band).float().numpy() - restricted).max()),
        "torch_vs_core_full": float(
            np.abs(torch_core().float().numpy() - np.asarray(core(q, k, v, jnp.int32(0)), np.float32)).max()
        ),
    }
    sides = {
        "ours_full": lambda: ours(params, x, jnp.int32(0)).block_until_ready(),
        "ours_band": lambda: ours(params, x, jnp.int32(1)).block_until_ready(),
        "library_full": lambda: library(params, x).block_until_ready(),
        "torch_full": lambda: torch_layer(None),
        "torch_band": lambda: torch_layer(band),
        "core_full": lambda: core(q, k, v, jnp.int32(0)).block_until_ready(),
        "core_band": lambda: core(q, k, v, jnp.int32(1)).block_until_ready(),
        "torch_core": torch_core,
    }
    for side in sides.values():  # compiled and warm before timing
        side()
    clock = time.process_time if _CLOCK.value == "cpu" else time.perf_counter
    times = interleaved(list(sides.values()), _REPEATS.value, clock)
    ms = {name: round(1e3 * min(t), 2) for name, t in zip(sides, times)}
    row = {
        "length": length,
        "ms": ms,
        "ours_full_over_torch": round(ms["ours_full"] / ms["torch_full"], 2),
        "ours_band_over_torch_band": round(ms["ours_band"] / ms["torch_band"], 2),
        "ours_full_over_band": round(ms["ours_full"] / ms["ours_band"], 2),
        "library_over_ours_full": round(ms["library_full"] / ms["ours_full"], 2),
        "core_full_over_band": round(ms["core_full"] / ms["core_band"], 2),
        "core_full_over_torch_core": round(ms["core_full"] / ms["torch_core"], 2),
        "max_abs_difference": checks,
    }
    print(json.dumps(row), flush=True)
    return row


SINGLE_THREAD_XLA = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def main(argv):
    del argv
    import torch

    if _CLOCK.value == "cpu":
        missing = [f for f in SINGLE_THREAD_XLA if f not in os.environ.get("XLA_FLAGS", "")]
        if missing:
            print(
                f"error: --clock=cpu needs XLA_FLAGS to contain {' '.join(missing)} (one XLA thread)", file=sys.stderr
            )
            sys.exit(2)
        torch.set_num_threads(1)

    rows = [measure(int(t)) for t in _LENGTHS.value]
    meta = {
        **machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dim": _DIM.value,
        "heads": _HEADS.value,
        "batch": _BATCH.value,
        "dtype": _DTYPE.value,
        "repeats": _REPEATS.value,
        "clock": _CLOCK.value,
    }
    path = Path(_OUT.value).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

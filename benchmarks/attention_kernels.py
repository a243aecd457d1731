"""The attention kernels of `model.attention` against each other on this machine's default JAX device.

For one LM size and dtype, per sequence length and stage (0 = full attention, 1 = the band): one decoding pass
(`LanguageModel(head=stage)`, a CFG pair of rows) with each kernel in `--kernels`, its time (min of `--repeats`)
and its max |logit difference| from the first kernel. A kernel that fails to compile or run on this platform is
reported with its error (cuDNN needs a GPU and a 16-bit dtype; splash runs compiled on a TPU, in interpret mode
elsewhere). Exit status 1 when a kernel that ran disagrees
with the first by more than `--tolerance` (relative to the logits' std).

  python benchmarks/attention_kernels.py --kernels=xla,cudnn --dtype=bfloat16     # on a GPU
  python benchmarks/attention_kernels.py --kernels=xla,splash --dtype=bfloat16    # on a TPU

Writes `benchmarks/results/attention_kernels.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import lm_config, machine

from magnet_jax.models.lm import LanguageModel, cast_params, init_params

_SIZE = flags.DEFINE_string("size", "512x8", "model: <dim>x<layers> or a preset")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "compute dtype")
_KERNELS = flags.DEFINE_list("kernels", ["xla", "cudnn"], "model.attention values; the first is the reference")
_LENGTHS = flags.DEFINE_list("lengths", ["498", "1500"], "sequence lengths (frames)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls per point")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.05, "max |logit difference| / logit std allowed")
_OUT = flags.DEFINE_string("out", "benchmarks/results/attention_kernels", "output path without extension")


def main(argv):
    del argv
    dtype = _DTYPE.value
    base = LanguageModel(lm_config(_SIZE.value))
    params = cast_params(jax.jit(lambda k: nn.meta.unbox(init_params(base, k)))(jax.random.key(0)), dtype)
    rows, failed = [], False
    for length in (int(t) for t in _LENGTHS.value):
        codes = jnp.asarray(np.random.default_rng(length).integers(0, 2049, (2, base.config.n_q, length)), jnp.int32)
        condition = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, base.config.dim)), dtype)
        for stage in (0, 1):
            reference = None
            for kernel in _KERNELS.value:
                model = LanguageModel(lm_config(_SIZE.value, dtype=dtype, param_dtype=dtype, attention=kernel))
                fn = jax.jit(lambda p, m=model, s=stage: m.apply({"params": p}, codes, condition, None, s, head=s))
                row = {"length": length, "stage": stage, "kernel": kernel}
                try:
                    logits = np.asarray(fn(params))
                    times = []
                    for _ in range(_REPEATS.value):
                        start = time.perf_counter()
                        fn(params).block_until_ready()
                        times.append(time.perf_counter() - start)
                    row["ms"] = round(1e3 * min(times), 3)
                    if reference is None:
                        reference = logits
                    else:
                        diff = float(np.abs(logits - reference).max() / reference.std())
                        row["max_diff_over_std"] = round(diff, 5)
                        failed |= diff > _TOLERANCE.value
                except Exception as e:  # a kernel this platform lacks: reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    path = Path(_OUT.value).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "size": _SIZE.value, "dtype": dtype, "kernels": _KERNELS.value}
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)

"""Optimizer, learning-rate schedule and EMA of MAGNeT training (docs/design.md §4.6).

Public API:
  check_optim_config(optim_cfg)                        one-line ValueError naming the first field out of range
  learning_rate_schedule(optim_cfg) -> optax.Schedule   the reference's cosine schedule with linear warm-up
  make_optimizer(optim_cfg) -> optax.GradientTransformation
      global-norm clipping, then AdamW (`name='adamw'`) or D-Adaptation AdamW (`name='dadam'`, optax.contrib, the
      reference's small-model optimizer, lr = 1 scaled by the schedule); weight decay on every parameter, as the
      reference.
  ema_update(ema, params, step, *, decay, every) -> ema
  all_finite(tree) -> bool scalar

`optim_cfg` is the `optim` section of `configs/magnet.py` (name, lr, b1, b2, eps, weight_decay, schedule,
warmup_steps, lr_min_ratio, total_steps, clip_norm, ema_decay, ema_every, grad_accum_steps).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib

# field -> (test, what it must be); checked in this order
_FIELD_CHECKS = {
    "lr": (lambda v: v > 0, "> 0"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "lr_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_norm": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "grad_accum_steps": (lambda v: v >= 1, ">= 1"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_every": (lambda v: v >= 1, ">= 1"),
}


def check_optim_config(optim_cfg) -> None:
    """Raises a one-line ValueError for the first `optim` field out of its range (e.g. `optim.lr=-1`), or a warm-up
    as long as the run, naming the field to set."""
    for field, (ok, expected) in _FIELD_CHECKS.items():
        value = optim_cfg[field]
        if not ok(value):
            raise ValueError(f"optim.{field}={value}: expected {expected}")
    if optim_cfg.total_steps < 1:
        raise ValueError(f"optim.total_steps={optim_cfg.total_steps} (train.num_steps): expected >= 1")
    if not 0 <= optim_cfg.warmup_steps < optim_cfg.total_steps:
        raise ValueError(
            f"optim.warmup_steps={optim_cfg.warmup_steps} (the preset's warm-up unless set) must be in [0, "
            f"train.num_steps={optim_cfg.total_steps}): set --config.optim.warmup_steps below it, e.g. "
            f"--config.optim.warmup_steps={optim_cfg.total_steps // 10}"
        )


def learning_rate_schedule(optim_cfg) -> optax.Schedule:
    """audiocraft's CosineLRScheduler: lr·n/W during warm-up, then lr·(m + ½(1 − m)(1 + cos(π s))), s = (n − W)/(N − W).

    n counts applied updates (the first update uses n = 0), W = `warmup_steps`, N = `total_steps`,
    m = `lr_min_ratio`; after N the rate stays at lr·m.
    """
    if optim_cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: expected 'cosine'")
    check_optim_config(optim_cfg)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps,
        decay_steps=optim_cfg.total_steps,
        end_value=optim_cfg.lr * optim_cfg.lr_min_ratio,
    )


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """Clipping + AdamW or D-Adaptation AdamW with the reference's hyper-parameters (β 0.9/0.95, wd 0.1, ε 1e-8)."""
    schedule = learning_rate_schedule(optim_cfg)
    if optim_cfg.name == "adamw":
        base = optax.adamw(
            schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
        )
    elif optim_cfg.name == "dadam":
        base = _wait_for_first_step(
            optax.contrib.dadapt_adamw(
                schedule, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
            )
        )
    else:
        raise ValueError(f"optim.name={optim_cfg.name!r}: expected 'adamw' or 'dadam'")
    if optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), base)
    return base


def _wait_for_first_step(dadapt: optax.GradientTransformation) -> optax.GradientTransformation:
    """D-Adaptation that, like the reference's DAdaptAdam, makes no update while its gradient sum is still zero.

    With warm-up the first learning rate is 0, so optax's estimate would be 0 / 0 (NaN forever); the reference
    returns early on such a step. Here the step only advances the schedule's count.
    """

    def update(updates, state, params=None):
        new_updates, new_state = dadapt.update(updates, state, params)
        started = optax.tree.sum(jax.tree.map(jnp.abs, new_state.grad_sum)) > 0
        kept = state._replace(count=new_state.count)
        return (
            jax.tree.map(lambda u: jnp.where(started, u, jnp.zeros_like(u)), new_updates),
            jax.tree.map(lambda n, k: jnp.where(started, n, k), new_state, kept),
        )

    return optax.GradientTransformation(dadapt.init, update)


def ema_update(ema: Any, params: Any, step: jax.Array, *, decay: float, every: int) -> Any:
    """The reference's bias-corrected EMA (audiocraft ModuleDictEMA, `unbias=True`), stepped every `every` steps.

    After training step `step` (0-based), when `(step + 1) % every == 0`, this is the n-th EMA update,
    n = (step + 1) // every, and `ema <- (1 − w) ema + w params` with w = 1 / Σ_{i<n} decay^i = (1 − d) / (1 − d^n)
    (so the first update copies the parameters). Otherwise `ema` is returned unchanged.
    """
    count = (step + 1) // every
    due = ((step + 1) % every == 0) & (count > 0)
    d = jnp.float32(decay)
    weight = jnp.where(due, (1.0 - d) / (1.0 - d ** count.astype(jnp.float32)), 0.0)
    return jax.tree.map(lambda e, p: e + weight.astype(e.dtype) * (p.astype(e.dtype) - e), ema, params)


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

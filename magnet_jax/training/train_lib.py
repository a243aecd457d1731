"""MAGNeT training state and the sharded, jitted train / eval steps (docs/design.md §4, §5.2).

A batch is `{'codes': int32 [B, K, T], 'text_ids': int32 [B, L], 'text_mask': int32 [B, L]}` (global arrays sharded
over the `batch` rule, `sharding.batch_sharding`). `key` is the run's base PRNG key: the train step folds in
`state.step`, so every step draws new masks and a resumed run repeats the same draws.

One train step, all inside one jitted function: frozen T5 on the text (no gradient), CFG dropout (one Bernoulli per
batch), the condition projection and the `attend` mask, the objective's draw (a stage s for the whole batch, span
masks; for Hybrid-MAGNeT also a per-sample prefix boundary), the LM at stage s, cross-entropy on the objective's
tokens; gradients accumulated over `optim.grad_accum_steps` microbatches (`lax.scan`; sums of cross-entropy and of
token counts, so k microbatches equal one big batch); clipping + AdamW / D-Adaptation; a step whose loss, gradients
or updated params are not finite leaves params and optimizer state unchanged and increments `skipped_steps`; the
reference's EMA every `optim.ema_every` steps. Parameters are float32 (master weights); `model.dtype='bfloat16'`
computes in bfloat16.

Metrics (float32 scalars): loss (mean cross-entropy over the objective's tokens), ppl, loss_stage{s} / ppl_stage{s}
(NaN for the stages not trained this step; `metrics.summarize` skips NaN), stage, mask_fraction, grad_norm (before
clipping), lr (the schedule's value; D-Adaptation multiplies it by its own estimate), skipped_steps; with the hybrid
objective also `ar_loss` / `nar_loss` (means over the prefix and the masked suffix tokens; NaN when a step has none).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from magnet_jax import sharding
from magnet_jax.checkpoints.pretrained import config_from_training, save_pretrained
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.checkpoints.weights import check_finite
from magnet_jax.fileio import WeightsError
from magnet_jax.models import conditioner, objectives, t5
from magnet_jax.models.lm import LanguageModel, LMConfig, config_differences, init_params
from magnet_jax.models.t5 import T5Config
from magnet_jax.training import masking
from magnet_jax.training.optim import all_finite, ema_update, learning_rate_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (a pytree; checkpointed as is).

    step: int32, training steps run (applied or skipped); params / ema_params: LM params (float32);
    opt_state: optax state of `optim.make_optimizer`; skipped_steps: int32, steps skipped for non-finite gradients.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    skipped_steps: jax.Array


def build_model(config) -> LanguageModel:
    return LanguageModel(LMConfig.from_config(config.model))


def _state_from_params(config, params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=make_optimizer(config.optim).init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        skipped_steps=zero,
    )


def _boxed_state(config, key) -> TrainState:
    """The scratch-init state with Linen logical-axis boxes on params, EMA and optimizer moments."""
    return _state_from_params(config, init_params(build_model(config), key))


def train_state_shardings(config, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state of `jax.ShapeDtypeStruct`s, matching tree of NamedShardings) from `jax.eval_shape` of init."""
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(functools.partial(_boxed_state, config), jax.random.key(0))
    return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def _load_init_params(config, shardings) -> Any:
    """Params of `config.train.init_from` (any `sources.load_lm` source: a converted checkpoint, a training workdir,
    released weights), checked against the configured architecture and placed in `shardings`."""
    source = config.train.init_from
    saved, params = load_lm(source, dtype=config.model.param_dtype, scan_layers=config.model.scan_layers)
    for field, theirs, ours in config_differences(saved["model"], dict(config.model), architecture_only=True):
        raise WeightsError(f"{source}: its model.{field}={theirs!r} but the training config has model.{field}={ours!r}")
    return jax.device_put(params, shardings)


def create_train_state(config, key: jax.Array, *, mesh=None) -> TrainState:
    """A fresh TrainState: scratch init from `key`, or the params of `config.train.init_from` (then `key` is unused).

    With `mesh`, every leaf is created directly in its sharding (`train_state_shardings`); without, on the default
    device.
    """
    if mesh is None:
        mesh = sharding.single_device_mesh()
    _, shardings = train_state_shardings(config, mesh)
    # Init runs without activation constraints (Linen's DenseGeneral init reshapes boxed kernels, which a mesh
    # context would constrain at the wrong rank); `out_shardings` places every leaf.
    if config.train.init_from:
        params = _load_init_params(config, shardings.params)
        return jax.jit(
            functools.partial(_state_from_params, config), in_shardings=(shardings.params,), out_shardings=shardings
        )(params)
    return jax.jit(lambda k: nn.meta.unbox(_boxed_state(config, k)), out_shardings=shardings)(key)


def _condition(model: LanguageModel, params, t5_config, t5_params, text_ids, text_mask) -> jax.Array:
    """Frozen T5 states of the text -> LM conditioning `[B, L, D]` (zero at masked positions)."""
    states = conditioner.encode_text(t5_config, t5_params, text_ids, text_mask)
    return model.apply({"params": params}, states, text_mask, method=model.project_condition)


def _microbatches(tree: Any, count: int, mesh) -> Any:
    """`[B, ...]` leaves -> `[count, B / count, ...]`; microbatch j holds samples j, j + count, ... so that each
    microbatch stays spread over the devices of the batch axis."""

    def split(x):
        if x.shape[0] % count:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by optim.grad_accum_steps={count}")
        x = jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2), mesh=mesh)

    return jax.tree.map(split, tree)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _per_stage(value: jax.Array, stage: jax.Array, n_q: int, name: str) -> dict[str, jax.Array]:
    return {f"{name}_stage{s}": jnp.where(stage == s, value, jnp.nan) for s in range(n_q)}


class _MagnetLoss:
    """MAGNeT: span masks on codebook `stage`, cross-entropy on its masked tokens."""

    def draw(self, config, codes: jax.Array, key: jax.Array, mask_id: int, stage=None) -> masking.MaskedBatch:
        table = masking.span_count_table(codes.shape[-1], config.masking.span_len)
        return masking.mask_batch(key, codes, table, config.masking.span_len, mask_id, stage=stage)

    def sums(self, logits: jax.Array, micro: Mapping[str, jax.Array], stage: jax.Array) -> dict[str, jax.Array]:
        ce, count = masking.masked_cross_entropy(logits, micro["codes"], stage, micro["mask"])
        return {"ce": ce, "count": count, "masked": count}


class _HybridLoss:
    """Hybrid-MAGNeT: a prefix boundary per sample, span masks in codebook `stage`'s suffix; cross-entropy on every
    prefix token and the masked suffix tokens (also reported apart as `ar_*` / `nar_*`)."""

    def draw(self, config, codes: jax.Array, key: jax.Array, mask_id: int, stage=None) -> masking.HybridBatch:
        tables = masking.span_count_tables(codes.shape[-1], config.masking.span_len)
        return masking.hybrid_batch(key, codes, tables, config.masking.span_len, mask_id, stage=stage)

    def sums(self, logits: jax.Array, micro: Mapping[str, jax.Array], stage: jax.Array) -> dict[str, jax.Array]:
        sums = masking.hybrid_cross_entropy(logits, micro["codes"], micro["boundary"], stage, micro["mask"])
        return {
            "ce": sums["ar_ce"] + sums["nar_ce"],
            "count": sums["ar_count"] + sums["nar_count"],
            "masked": sums["nar_count"],
            **sums,
        }


_LOSSES = {objectives.MAGNET: _MagnetLoss(), objectives.HYBRID: _HybridLoss()}


def _objective(config) -> tuple[objectives.Objective, _MagnetLoss | _HybridLoss]:
    """The run's objective (`train.objective`) and its loss."""
    objective = objectives.get(config.train.objective, "train.objective")
    if objective.delay_layout and config.model.causal:
        raise ValueError(f"train.objective={objective.name!r} needs a non-causal model (model.causal=False)")
    return objective, _LOSSES[objective]


def _drawn_arrays(drawn) -> dict[str, jax.Array]:
    """The per-sample arrays of a draw (`inputs`, `mask`, and `boundary` for hybrid): what microbatches split."""
    return {f.name: getattr(drawn, f.name) for f in dataclasses.fields(drawn) if f.name != "stage"}


def _loss_sums(
    config,
    model: LanguageModel,
    variables,
    micro: Mapping[str, jax.Array],
    stage: jax.Array,
    condition: jax.Array | None,
    attend: jax.Array,
    cross_kv=None,
) -> dict[str, jax.Array]:
    """Cross-entropy sums of the objective: `ce`, `count`, `masked` (and `ar_*`, `nar_*` for hybrid), float32."""
    objective, loss = _objective(config)
    logits = objective.logits(
        model, variables, micro["inputs"], stage, condition, attend, boundary=micro.get("boundary"), cross_kv=cross_kv
    )
    return loss.sums(logits, micro, stage)


def _part_losses(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Hybrid's `ar_loss` / `nar_loss` (NaN where a part has no tokens); nothing for MAGNeT."""
    return {
        f"{part}_loss": jnp.where(
            sums[f"{part}_count"] > 0, sums[f"{part}_ce"] / jnp.maximum(sums[f"{part}_count"], 1.0), jnp.nan
        )
        for part in ("ar", "nar")
        if f"{part}_count" in sums
    }


def _train_step(
    config, mesh, t5_config, state: TrainState, t5_params, batch: Mapping[str, jax.Array], key: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    model = build_model(config)
    tx = make_optimizer(config.optim)
    lm = model.config
    codes = batch["codes"]
    mask_key, cfg_key = jax.random.split(jax.random.fold_in(key, state.step))
    masked = _objective(config)[1].draw(config, codes, mask_key, lm.mask_id)
    text_mask = conditioner.cfg_dropout(cfg_key, batch["text_mask"], config.conditioner.cfg_dropout)
    # `attend` is defined over the whole global batch (the longest description), so microbatching does not change it.
    attend = conditioner.cross_attend(batch["text_ids"])
    inputs = {
        "codes": codes,
        **_drawn_arrays(masked),
        "text_ids": batch["text_ids"],
        "text_mask": text_mask,
        "attend": attend,
    }

    def loss_sums(params, micro):
        condition = _condition(model, params, t5_config, t5_params, micro["text_ids"], micro["text_mask"])
        sums = _loss_sums(config, model, {"params": params}, micro, masked.stage, condition, micro["attend"])
        return sums["ce"], sums

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    accum = config.optim.grad_accum_steps
    if accum == 1:
        (_, sums), grads = grad_fn(state.params, inputs)
    else:

        def body(carry, micro):
            grads, sums = carry
            (_, s), g = grad_fn(state.params, micro)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, inputs)[0][1])
        (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), _microbatches(inputs, accum, mesh))
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
    loss = sums["ce"] / count

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    applied = optax.apply_updates(state.params, updates)
    finite = all_finite(grads) & jnp.isfinite(loss) & all_finite(applied)
    params = _select(finite, applied, state.params)
    opt_state = _select(finite, opt_state, state.opt_state)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    ema = ema_update(state.ema_params, params, state.step, decay=config.optim.ema_decay, every=config.optim.ema_every)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, skipped_steps=skipped
    )

    ppl = jnp.exp(loss)
    metrics = {
        "loss": loss,
        "ppl": ppl,
        **_per_stage(loss, masked.stage, lm.n_q, "loss"),
        **_per_stage(ppl, masked.stage, lm.n_q, "ppl"),
        "stage": masked.stage.astype(jnp.float32),
        "mask_fraction": sums["masked"] / masked.mask.size,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate_schedule(config.optim)(state.step - state.skipped_steps).astype(jnp.float32),
        "skipped_steps": skipped.astype(jnp.float32),
        **_part_losses(sums),
    }
    return new_state, metrics


def make_train_step(config, mesh, t5_config: T5Config):
    """The jitted, sharded train step `(state, t5_params, batch, key) -> (state, metrics)`; `state` is donated.

    `t5_params` (frozen, not donated, not optimised) must be placed with `t5.param_shardings`, the batch with
    `sharding.batch_sharding`, `state` with `train_state_shardings` (as `create_train_state(mesh=...)` does).
    """
    if config.optim.grad_accum_steps < 1:
        raise ValueError(f"optim.grad_accum_steps={config.optim.grad_accum_steps}: expected >= 1")
    _objective(config)
    rules = sharding.logical_rules(config)
    _, state_shardings = train_state_shardings(config, mesh)

    def step(state, t5_params, batch, key):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _train_step(config, mesh, t5_config, state, t5_params, batch, key)

    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(
            state_shardings,
            t5.param_shardings(t5_config, mesh, rules),
            sharding.batch_sharding(mesh, rules),
            sharding.replicated(mesh),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )


def _eval_step(config, t5_config, params, t5_params, batch, key) -> dict[str, jax.Array]:
    model = build_model(config)
    lm = model.config
    codes = batch["codes"]
    condition = _condition(model, params, t5_config, t5_params, batch["text_ids"], batch["text_mask"])
    cross_kv = model.apply({"params": params}, condition, method=model.cross_key_values)
    attend = conditioner.cross_attend(batch["text_ids"])
    loss = _objective(config)[1]
    metrics, nar_losses = {}, []
    for stage in range(lm.n_q):
        drawn = loss.draw(config, codes, key, lm.mask_id, stage=stage)  # the same masks (and boundaries) each stage
        micro = {"codes": codes, **_drawn_arrays(drawn)}
        sums = _loss_sums(config, model, {"params": params}, micro, stage, None, attend, cross_kv=cross_kv)
        metrics[f"loss_stage{stage}"] = sums["ce"] / jnp.maximum(sums["count"], 1.0)
        metrics[f"ppl_stage{stage}"] = jnp.exp(metrics[f"loss_stage{stage}"])
        parts = _part_losses(sums)
        if parts:  # hybrid: prefix rows never see the masked suffix, so the AR loss is the same at every stage
            metrics["ar_loss"] = parts["ar_loss"]
            nar_losses.append(parts["nar_loss"])
    metrics["loss"] = sum(metrics[f"loss_stage{s}"] for s in range(lm.n_q)) / lm.n_q
    metrics["ppl"] = jnp.exp(metrics["loss"])
    if nar_losses:
        metrics["nar_loss"] = sum(nar_losses) / lm.n_q
    return metrics


def make_eval_step(config, mesh, t5_config: T5Config):
    """The jitted eval step `(params, t5_params, batch, key) -> metrics`.

    The same span masks (drawn from `key`: pass a fixed key for comparable evaluations) are scored at every stage,
    without CFG dropout: loss_stage{s}, ppl_stage{s} for s = 0..K-1, and their mean `loss` / `ppl`. With the hybrid
    objective the same boundaries, rates and noise serve every stage, loss_stage{s} is the hybrid loss at stage s,
    `ar_loss` the prefix loss (the same at every stage) and `nar_loss` the mean over stages of the masked-suffix
    loss. Pass `state.ema_params` to evaluate the EMA weights.
    """
    _objective(config)
    rules = sharding.logical_rules(config)
    _, state_shardings = train_state_shardings(config, mesh)

    def step(params, t5_params, batch, key):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _eval_step(config, t5_config, params, t5_params, batch, key)

    return jax.jit(
        step,
        in_shardings=(
            state_shardings.params,
            t5.param_shardings(t5_config, mesh, rules),
            sharding.batch_sharding(mesh, rules),
            sharding.replicated(mesh),
        ),
        out_shardings=sharding.replicated(mesh),
    )


def export_params(
    state: TrainState, directory: str, config, *, use_ema: bool = True, dtype: str = "float32", overwrite: bool = False
) -> None:
    """Writes the params-only checkpoint that generation and fine-tuning load (`pretrained.save_pretrained`).

    Args:
      state: the train state (sharded arrays are fine).
      directory: output directory (written atomically by `save_pretrained`).
      config: the training config (config.json: `pretrained.config_from_training`).
      use_ema: export `state.ema_params` (default, as the reference exports its EMA/best state) or `state.params`.
      dtype: "float32" or "bfloat16" for the stored params.
      overwrite: replace an existing export (else an existing `directory` is an error).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export dtype={dtype!r}: expected 'float32' or 'bfloat16'")
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), state.ema_params if use_ema else state.params)
    check_finite(params, where=f"refusing to export to {directory}")  # a diverged state is never exported
    save_pretrained(
        directory,
        params,
        config_from_training(
            config,
            step=jax.device_get(state.step),
            weights="ema" if use_ema else "params",
            dtype=dtype,
            source="magnet_jax training",
        ),
        overwrite=overwrite,
    )

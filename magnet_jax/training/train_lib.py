"""MAGNeT training state and the sharded, jitted train / eval steps (magnet-spec §4).

Public API (api_contracts.md):
  TrainState                                   step, params, opt_state, ema_params, skipped_steps
  build_model(config) -> LanguageModel
  train_state_shardings(config, mesh) -> (abstract_state, shardings)
  create_train_state(config, key, *, mesh=None) -> TrainState
      scratch init (`lm.init_params`, the reference's init) or, when `config.train.init_from` is set, the params of a
      converted checkpoint directory (`magnet_jax.checkpoints.pretrained.save_pretrained` format) to fine-tune; with `mesh` the
      state is created directly in its shardings.
  text_encoder_shardings(t5_config, mesh, rules) -> shardings of the frozen T5 params
  make_train_step(config, mesh, t5_config) -> step(state, t5_params, batch, key) -> (state, metrics)
  make_eval_step(config, mesh, t5_config) -> step(params, t5_params, batch, key) -> metrics
  exported_config(config, *, step, weights, dtype, source) -> config.json dict of a params export
  export_params(state, directory, config, *, use_ema=True, dtype="float32")

A batch is `{'codes': int32 [B, K, T], 'text_ids': int32 [B, L], 'text_mask': int32 [B, L]}` (global arrays sharded
over the `batch` rule, `sharding.batch_sharding`). `key` is the run's base PRNG key: the train step folds in
`state.step`, so every step draws new masks and a resumed run repeats the same draws.

One train step, all inside one jitted function: frozen T5 on the text (no gradient), CFG dropout (one Bernoulli per
batch), the condition projection and the `attend` mask, a stage s drawn for the whole batch, span masks
(`masking.mask_batch`), the LM at stage s (band attention for s >= 1), cross-entropy on the masked tokens of
codebook s; gradients accumulated over `optim.grad_accum_steps` microbatches (`lax.scan`; sums of cross-entropy and
of masked-token counts, so k microbatches equal one big batch); clipping + AdamW / D-Adaptation; a step whose
gradients are not finite leaves params and optimizer state unchanged and increments `skipped_steps`; the
reference's EMA every `optim.ema_every` steps. Parameters are float32 (master weights); `model.dtype='bfloat16'`
computes in bfloat16.

Metrics (float32 scalars): loss (mean cross-entropy over masked tokens), ppl, loss_stage{s} / ppl_stage{s} (NaN for
the stages not trained this step; `metrics.summarize` skips NaN), stage, mask_fraction, grad_norm (before clipping),
lr (the schedule's value; D-Adaptation multiplies it by its own estimate), skipped_steps.

`config.train.objective` selects the loss: "magnet" (above) or "hybrid" (Hybrid-MAGNeT, `magnet_jax.generation.hybrid`: the
delay layout, a per-sample autoregressive prefix in the loss beside the masked suffix tokens of stage s; needs
`model.causal=False`). With "hybrid", `loss` is the mean over prefix and masked tokens, and `ar_loss` / `nar_loss`
(means over their own tokens; NaN when a step has none) are added; mask_fraction counts the masked suffix tokens.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from magnet_jax import sharding

from magnet_jax.generation import hybrid

from magnet_jax.models import conditioner

from magnet_jax.training import masking
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params
from magnet_jax.training.optim import all_finite, ema_update, learning_rate_schedule, make_optimizer
from magnet_jax.models.t5 import T5Config, T5Encoder
from magnet_jax.checkpoints.weights import WeightsError

OBJECTIVES = ("magnet", "hybrid")  # config.train.objective
# LMConfig fields that define the architecture: a checkpoint to fine-tune must match them (dtype, remat,
# scan_layers are run-time choices).
ARCHITECTURE_FIELDS = ("dim", "num_heads", "num_layers", "hidden_scale", "n_q", "card", "cond_dim", "causal",
                       "subcodes_context", "norm_eps", "max_period")


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
    return TrainState(step=zero, params=params, opt_state=make_optimizer(config.optim).init(params),
                      ema_params=jax.tree.map(jnp.copy, params), skipped_steps=zero)


def _boxed_state(config, key) -> TrainState:
    """The scratch-init state with Linen logical-axis boxes on params, EMA and optimizer moments."""
    return _state_from_params(config, init_params(build_model(config), key))


def train_state_shardings(config, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state of `jax.ShapeDtypeStruct`s, matching tree of NamedShardings) from `jax.eval_shape` of init."""
    rules = sharding.logical_rules(config)
    boxed = jax.eval_shape(functools.partial(_boxed_state, config), jax.random.key(0))
    return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def _load_init_params(config, shardings) -> Any:
    """Params of `config.train.init_from`, checked against the configured architecture and placed in `shardings`.

    The source is a converted checkpoint directory (`pretrained.save_pretrained`, e.g. `python -m
    magnet_jax.convert` of `facebook/magnet-small-10secs`) or anything else `pretrained.load_lm` reads (released
    audiocraft / transformers weights, converted on the fly).
    """
    from magnet_jax.checkpoints.pretrained import load_lm
    source = config.train.init_from
    saved, params = load_lm(source, dtype=config.model.param_dtype, scan_layers=config.model.scan_layers)
    for field in ARCHITECTURE_FIELDS:
        if saved["model"].get(field) != config.model[field]:
            raise WeightsError(f"{source}: its model.{field}={saved['model'].get(field)!r} but the training "
                               f"config has model.{field}={config.model[field]!r}")
    return jax.device_put(params, shardings)


def create_train_state(config, key: jax.Array, *, mesh=None) -> TrainState:
    """A fresh TrainState: scratch init from `key`, or the params of `config.train.init_from` (then `key` is unused).

    With `mesh`, every leaf is created directly in its sharding (`train_state_shardings`); without, on the default
    device.
    """
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, shardings = train_state_shardings(config, mesh)
    # Init runs without activation constraints (Linen's DenseGeneral init reshapes boxed kernels, which a mesh
    # context would constrain at the wrong rank); `out_shardings` places every leaf.
    if config.train.init_from:
        params = _load_init_params(config, shardings.params)
        return jax.jit(functools.partial(_state_from_params, config), in_shardings=(shardings.params,),
                       out_shardings=shardings)(params)
    return jax.jit(lambda k: nn.meta.unbox(_boxed_state(config, k)), out_shardings=shardings)(key)


def text_encoder_shardings(t5_config: T5Config, mesh, rules) -> Any:
    """Shardings of the frozen T5 params (from its logical-axis metadata), for `jax.device_put` and the steps."""
    encoder = T5Encoder(t5_config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda k: encoder.init(k, tokens, tokens)["params"], jax.random.key(0))
    return sharding.logical_shardings(boxed, mesh, rules)


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


def _check_objective(config) -> None:
    objective = config.train.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if objective == "hybrid" and config.model.causal:
        raise ValueError("train.objective='hybrid' needs a non-causal model (model.causal=False)")


def _draw_masks(config, lm: LMConfig, codes: jax.Array, key: jax.Array, stage=None):
    """The objective's masking of `codes [B, K, T]`: `masking.MaskedBatch` or `masking.HybridBatch` (`stage` given:
    that stage, the same other draws for every stage; hybrid only)."""
    span_len, length = config.masking.span_len, codes.shape[-1]
    if config.train.objective == "hybrid":
        tables = masking.span_count_tables(length, span_len)
        return masking.hybrid_batch(key, codes, tables, span_len, lm.mask_id, stage=stage)
    return masking.mask_batch(key, codes, masking.span_count_table(length, span_len), span_len, lm.mask_id)


def _loss_sums(config, model: LanguageModel, variables, micro: Mapping[str, jax.Array], stage: jax.Array,
               condition: jax.Array | None, attend: jax.Array, cross_kv=None) -> dict[str, jax.Array]:
    """Cross-entropy sums of the objective: `ce`, `count` (and `ar_*`, `nar_*` for hybrid), float32 scalars."""
    if config.train.objective == "hybrid":
        logits = hybrid.hybrid_logits(model, variables, micro["inputs"], micro["boundary"], stage, condition, attend,
                                      cross_kv=cross_kv)
        sums = masking.hybrid_cross_entropy(logits, micro["codes"], micro["boundary"], stage, micro["mask"])
        return {"ce": sums["ar_ce"] + sums["nar_ce"], "count": sums["ar_count"] + sums["nar_count"], **sums}
    logits = model.apply(variables, micro["inputs"], condition, attend, stage, cross_kv=cross_kv)
    ce_sum, count = masking.masked_cross_entropy(logits, micro["codes"], stage, micro["mask"])
    return {"ce": ce_sum, "count": count}


def _part_losses(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Hybrid's `ar_loss` / `nar_loss` (NaN where a part has no tokens); nothing for MAGNeT."""
    return {f"{part}_loss": jnp.where(sums[f"{part}_count"] > 0, sums[f"{part}_ce"] / jnp.maximum(
        sums[f"{part}_count"], 1.0), jnp.nan) for part in ("ar", "nar") if f"{part}_count" in sums}


def _train_step(config, mesh, t5_config, state: TrainState, t5_params, batch: Mapping[str, jax.Array],
                key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    model = build_model(config)
    tx = make_optimizer(config.optim)
    lm = model.config
    codes = batch["codes"]
    mask_key, cfg_key = jax.random.split(jax.random.fold_in(key, state.step))
    masked = _draw_masks(config, lm, codes, mask_key)
    text_mask = conditioner.cfg_dropout(cfg_key, batch["text_mask"], config.conditioner.cfg_dropout)
    # `attend` is defined over the whole global batch (the longest description), so microbatching does not change it.
    attend = conditioner.cross_attend(batch["text_ids"])
    inputs = {"codes": codes, "inputs": masked.inputs, "mask": masked.mask, "text_ids": batch["text_ids"],
              "text_mask": text_mask, "attend": attend}
    if config.train.objective == "hybrid":
        inputs["boundary"] = masked.boundary

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

    finite = all_finite(grads) & jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = _select(finite, optax.apply_updates(state.params, updates), state.params)
    opt_state = _select(finite, opt_state, state.opt_state)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    ema = ema_update(state.ema_params, params, state.step, decay=config.optim.ema_decay,
                     every=config.optim.ema_every)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                           skipped_steps=skipped)

    ppl = jnp.exp(loss)
    metrics = {"loss": loss, "ppl": ppl, **_per_stage(loss, masked.stage, lm.n_q, "loss"),
               **_per_stage(ppl, masked.stage, lm.n_q, "ppl"),
               "stage": masked.stage.astype(jnp.float32),
               "mask_fraction": sums["nar_count" if "nar_count" in sums else "count"] / masked.mask.size,
               "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.optim)(state.step - state.skipped_steps).astype(jnp.float32),
               "skipped_steps": skipped.astype(jnp.float32), **_part_losses(sums)}
    return new_state, metrics


def make_train_step(config, mesh, t5_config: T5Config):
    """The jitted, sharded train step `(state, t5_params, batch, key) -> (state, metrics)`; `state` is donated.

    `t5_params` (frozen, not donated, not optimised) must be placed with `text_encoder_shardings`, the batch with
    `sharding.batch_sharding`, `state` with `train_state_shardings` (as `create_train_state(mesh=...)` does).
    """
    if config.optim.grad_accum_steps < 1:
        raise ValueError(f"optim.grad_accum_steps={config.optim.grad_accum_steps}: expected >= 1")
    _check_objective(config)
    rules = sharding.logical_rules(config)
    _, state_shardings = train_state_shardings(config, mesh)

    def step(state, t5_params, batch, key):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _train_step(config, mesh, t5_config, state, t5_params, batch, key)
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(state_shardings, text_encoder_shardings(t5_config, mesh, rules),
                                 sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)))


def _eval_step(config, t5_config, params, t5_params, batch, key) -> dict[str, jax.Array]:
    model = build_model(config)
    lm = model.config
    codes = batch["codes"]
    condition = _condition(model, params, t5_config, t5_params, batch["text_ids"], batch["text_mask"])
    cross_kv = model.apply({"params": params}, condition, method=model.cross_key_values)
    attend = conditioner.cross_attend(batch["text_ids"])
    hybrid_objective = config.train.objective == "hybrid"
    if not hybrid_objective:
        rate_key, mask_key = jax.random.split(key)
        table = masking.span_count_table(codes.shape[-1], config.masking.span_len)
        rates = masking.sample_mask_rates(rate_key, codes.shape[0])
        mask = masking.time_mask(mask_key, rates, codes.shape[-1], table, config.masking.span_len)
    metrics, nar_losses = {}, []
    for stage in range(lm.n_q):
        if hybrid_objective:  # the same boundaries, rates and noise at every stage
            drawn = _draw_masks(config, lm, codes, key, stage=stage)
            micro = {"codes": codes, "inputs": drawn.inputs, "mask": drawn.mask, "boundary": drawn.boundary}
        else:
            micro = {"codes": codes, "inputs": masking.mask_codes(codes, stage, mask, lm.mask_id), "mask": mask}
        sums = _loss_sums(config, model, {"params": params}, micro, stage, None, attend, cross_kv=cross_kv)
        metrics[f"loss_stage{stage}"] = sums["ce"] / jnp.maximum(sums["count"], 1.0)
        metrics[f"ppl_stage{stage}"] = jnp.exp(metrics[f"loss_stage{stage}"])
        if hybrid_objective:  # prefix rows never see the masked suffix: the AR loss is the same at every stage
            metrics["ar_loss"] = _part_losses(sums)["ar_loss"]
            nar_losses.append(_part_losses(sums)["nar_loss"])
    metrics["loss"] = sum(metrics[f"loss_stage{s}"] for s in range(lm.n_q)) / lm.n_q
    metrics["ppl"] = jnp.exp(metrics["loss"])
    if hybrid_objective:
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
    _check_objective(config)
    rules = sharding.logical_rules(config)
    _, state_shardings = train_state_shardings(config, mesh)

    def step(params, t5_params, batch, key):
        with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _eval_step(config, t5_config, params, t5_params, batch, key)
    return jax.jit(step, in_shardings=(state_shardings.params, text_encoder_shardings(t5_config, mesh, rules),
                                       sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)),
                   out_shardings=sharding.replicated(mesh))


def exported_config(config, *, step: int, weights: str, dtype: str, source: str) -> dict:
    """The config.json of a params export of a run with training config `config` (`pretrained` format).

    Args:
      config: the training config: its model / conditioner / codec / data / generate sections, `train.objective`
        (top-level "objective": how the model is generated; absent in older configs = "magnet") and
        `masking.span_len` (the "generate" section's `span_len`: decoding re-masks spans of the trained length).
      step: the training step of the params; weights: "ema" or "params"; dtype: the stored params' dtype;
      source: what produced them (goes to "provenance").
    """
    model = LMConfig.from_config(config.model).to_dict()
    model["param_dtype"] = dtype
    return {
        "model": model,
        "objective": config.train.get("objective", "magnet"),
        "conditioner": {"t5": config.conditioner.t5, "t5_dim": config.conditioner.t5_dim},
        "codec": {"source": config.codec.source},
        "segment_seconds": float(config.data.segment_seconds),
        "generate": {**config.generate.to_dict(), "span_len": int(config.masking.span_len)},
        "provenance": {"source": source, "step": int(step), "weights": weights, "dtype": dtype},
    }


def export_params(state: TrainState, directory: str, config, *, use_ema: bool = True,
                  dtype: str = "float32") -> None:
    """Writes the params-only checkpoint that generation and fine-tuning load (`pretrained.save_pretrained`).

    Args:
      state: the train state (sharded arrays are fine).
      directory: output directory (written atomically by `save_pretrained`).
      config: the training config (config.json: `exported_config`).
      use_ema: export `state.ema_params` (default, as the reference exports its EMA/best state) or `state.params`.
      dtype: "float32" or "bfloat16" for the stored params.
    """
    from magnet_jax.checkpoints.pretrained import save_pretrained
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export dtype={dtype!r}: expected 'float32' or 'bfloat16'")
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), state.ema_params if use_ema else state.params)
    save_pretrained(directory, params, exported_config(
        config, step=jax.device_get(state.step), weights="ema" if use_ema else "params", dtype=dtype,
        source="magnet_jax training"))

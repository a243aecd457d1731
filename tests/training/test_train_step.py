"""The sharded train step on 8 simulated CPU devices: mesh invariance, learning, accumulation, skipping, EMA,
schedule, memory, export / fine-tune init, FLOPs."""

import importlib.util
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import PartitionSpec as P

from configs.magnet import get_config
from magnet_jax import sharding
from magnet_jax.checkpoints import t5_weights
from magnet_jax.checkpoints.pretrained import read_config
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.fileio import WeightsError
from magnet_jax.models import t5
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params
from magnet_jax.training import flops, optim, train_lib

CORPUS = [
    "rock music with heavy drums",
    "calm jazz piano at night",
    "ambient synth pad",
    "upbeat pop song",
    "orchestral strings and brass",
    "lofi hip hop beat",
] * 10
TEXT_LEN = 8


def _reference_module(relative: str):
    """Loads one audiocraft source file by path (it needs only torch), skipping the package's heavy __init__."""
    root = Path(importlib.util.find_spec("audiocraft").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(f"_ref_{Path(relative).stem}", root / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    directory = t5_weights.write_random_t5(tmp_path_factory.mktemp("t5"), corpus=CORPUS)
    t5_config, params = t5_weights.load_t5(str(directory))
    return t5_config, params, TextTokenizer(str(directory), max_length=TEXT_LEN)


def _config(**optim):
    c = get_config("size=tiny")
    c.data.segment_seconds = 0.64  # T = 32 frames
    c.mesh.fsdp = 1
    c.optim.update({**dict(lr=3e-3, warmup_steps=2, total_steps=200, ema_every=2, ema_decay=0.9), **optim})
    return c


def _batch(config, tokenizer, seed=0, size=8):
    """Structured codes (per-sample offset and period, codebook k = codebook 0 shifted) and real tokenized text."""
    rng = np.random.default_rng(seed)
    t = np.arange(config.data.seq_len)
    period, offset = rng.integers(2, 6, size)[:, None, None], rng.integers(0, 64, size)[:, None, None]
    codes = (offset + 3 * (t[None, None] % period) + 5 * np.arange(4)[None, :, None]) % config.model.card
    texts = [CORPUS[i] for i in rng.integers(0, 6, size)]
    texts[1] = None  # a null description
    tokens = tokenizer(texts)
    pad = ((0, 0), (0, TEXT_LEN - tokens["ids"].shape[1]))
    return {
        "codes": codes.astype(np.int32),
        "text_ids": np.pad(tokens["ids"], pad),
        "text_mask": np.pad(tokens["mask"], pad),
    }


_CACHE: dict = {}


def _cached(kind, config, mesh, build):
    """Memoises compiled steps and initial states per (config, mesh): compiling is most of these tests' time."""
    key = (kind, config.to_json(), mesh.devices.shape, tuple(d.id for d in mesh.devices.flat))
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _initial_state(config, mesh):
    """A fresh scratch-init state on `mesh` (created once per config on the host, then placed)."""
    host = _cached(
        "state", config, _one_device(), lambda: jax.device_get(train_lib.create_train_state(config, jax.random.key(0)))
    )
    return jax.device_put(host, train_lib.train_state_shardings(config, mesh)[1])


def _run(config, mesh, tiny_t5, batches, *, steps, state=None, key=jax.random.key(7)):
    """Runs `steps` train steps on `mesh` from `state` (default: the scratch init); returns (state, losses)."""
    t5_config, t5_params, _ = tiny_t5
    rules = sharding.logical_rules(config)
    state = _initial_state(config, mesh) if state is None else state
    step = _cached("step", config, mesh, lambda: train_lib.make_train_step(config, mesh, t5_config))
    t5_params = jax.device_put(t5_params, t5.param_shardings(t5_config, mesh, rules))
    losses = []
    for i in range(steps):
        batch = jax.device_put(batches[i % len(batches)], sharding.batch_sharding(mesh, rules))
        state, metrics = step(state, t5_params, batch, key)
        losses.append(float(metrics["loss"]))
    return state, losses


def _one_device():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _norm_rel_diff(a, b):
    """||a - b|| / ||b|| over the whole tree."""
    a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    diff = sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2)) for x, y in zip(a, b))
    return math.sqrt(diff / sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b))


def _max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )


def test_mesh_222_and_single_device_give_same_losses_and_params(tiny_t5):
    config = _config()
    batches = [_batch(config, tiny_t5[2], seed) for seed in range(3)]
    init = _initial_state(config, _one_device()).params
    single, single_losses = _run(config, _one_device(), tiny_t5, batches, steps=3)
    sharded, sharded_losses = _run(
        config, sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)), tiny_t5, batches, steps=3
    )
    assert sharded.params["blocks"]["linear1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert _norm_rel_diff(single.params, init) > 1e-3  # training moved the params
    diffs = {
        name: (_norm_rel_diff(a, b), _max_abs_diff(a, b))
        for name, a, b in (
            ("params", sharded.params, single.params),
            ("ema", sharded.ema_params, single.ema_params),
            ("opt_state", sharded.opt_state, single.opt_state),
        )
    }
    print(f"losses {single_losses} vs {sharded_losses}; (norm-relative, max abs) diffs {diffs}")
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for norm_relative, max_abs in diffs.values():
        assert norm_relative <= 1e-5 and max_abs <= 1e-5


def test_tiny_model_learns_structured_codes(tiny_t5):
    config = _config()
    mesh = _one_device()
    fixed = [_batch(config, tiny_t5[2], seed=0)]
    state, losses = _run(config, mesh, tiny_t5, fixed, steps=80)
    start, end = np.mean(losses[:4]), np.mean(losses[-8:])
    print(f"loss {start:.3f} -> {end:.3f}")
    assert end < 0.5 * start
    assert int(state.step) == 80 and int(state.skipped_steps) == 0


def test_gradient_accumulation_equals_one_big_batch(tiny_t5):
    batches = [_batch(_config(), tiny_t5[2], seed) for seed in range(2)]
    big, big_losses = _run(_config(), _one_device(), tiny_t5, batches, steps=2)
    accum, accum_losses = _run(_config(grad_accum_steps=4), _one_device(), tiny_t5, batches, steps=2)
    np.testing.assert_allclose(accum_losses, big_losses, rtol=1e-5)
    assert _norm_rel_diff(big.params, _initial_state(_config(), _one_device()).params) > 1e-3
    assert _norm_rel_diff(accum.params, big.params) <= 1e-5 and _max_abs_diff(accum.params, big.params) <= 1e-5


def test_non_finite_gradients_skip_the_update(tiny_t5):
    config = _config()
    mesh = _one_device()
    t5_config, t5_params, tokenizer = tiny_t5
    broken = (t5_config, jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan), t5_params), tokenizer)
    batches = [_batch(config, tokenizer)]
    state = _initial_state(config, mesh)
    before = jax.device_get((state.params, state.opt_state))
    state, losses = _run(config, mesh, broken, batches, steps=1, state=state)
    assert math.isnan(losses[0])
    assert int(state.step) == 1 and int(state.skipped_steps) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before)
    state, losses = _run(config, mesh, tiny_t5, batches, steps=2, state=state)  # (the first update has lr 0)
    assert all(np.isfinite(losses)) and int(state.skipped_steps) == 1 and int(state.opt_state[1][0].count) == 2
    assert _norm_rel_diff(state.params, before[0]) > 1e-4


def test_ema_matches_audiocraft_module_dict_ema(tiny_t5):
    """Every 2 steps, decay 0.9, bias-corrected: audiocraft's ModuleDictEMA run on the same parameter snapshots."""
    ema_module = _reference_module("optim/ema.py")
    config = _config()
    mesh = _one_device()
    batches = [_batch(config, tiny_t5[2], seed) for seed in range(2)]
    state = _initial_state(config, mesh)
    leaves = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in jax.tree.leaves(jax.device_get(state.params))]
    holder = torch.nn.Module()
    holder.weights = torch.nn.ParameterList(leaves)
    reference = ema_module.ModuleDictEMA(torch.nn.ModuleDict({"model": holder}), decay=0.9, device="cpu")
    for idx in range(5):
        state, _ = _run(config, mesh, tiny_t5, batches[idx % 2 :], steps=1, state=state)
        with torch.no_grad():
            for p, x in zip(leaves, jax.tree.leaves(jax.device_get(state.params))):
                p.copy_(torch.from_numpy(np.array(x)))
        if (idx + 1) % 2 == 0:  # audiocraft: after optimizer step idx when (idx + 1) % updates == 0
            reference.step()
    expected = [reference.state["model"][f"weights.{i}"].numpy() for i in range(len(leaves))]
    ours = jax.tree.leaves(jax.device_get(state.ema_params))
    current = jax.tree.leaves(jax.device_get(state.params))
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, current)) > 1e-4  # the EMA lags the params
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_lr_schedule_matches_audiocraft_cosine_scheduler():
    scheduler_module = _reference_module("optim/cosine_lr_scheduler.py")
    cfg = _config(lr=2e-3, warmup_steps=10, total_steps=50, lr_min_ratio=0.1).optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = scheduler_module.CosineLRScheduler(optimizer, total_steps=50, warmup_steps=10, lr_min_ratio=0.1)
    schedule = optim.learning_rate_schedule(cfg)
    for step in range(60):  # the rate applied by optimizer step `step`
        np.testing.assert_allclose(float(schedule(step)), optimizer.param_groups[0]["lr"], rtol=1e-5, atol=1e-12)
        optimizer.step()
        scheduler.step()


def test_dadapt_adam_makes_progress_from_a_zero_first_learning_rate():
    """D-Adaptation (the reference's small-model optimizer) with warm-up: no NaN from the lr-0 first step."""
    config = _config(name="dadam", lr=1.0, warmup_steps=3, clip_norm=0.0, weight_decay=0.0)
    tx = optim.make_optimizer(config.optim)
    target = jnp.linspace(-1.0, 1.0, 16)
    params = {"w": jnp.zeros(16)}
    state = tx.init(params)

    def loss(p):
        return jnp.sum((p["w"] - target) ** 2)

    for _ in range(60):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert np.isfinite(float(loss(params))) and float(loss(params)) < 0.1 * float(loss({"w": jnp.zeros(16)}))
    config = _config(name="dadam", lr=1.0)  # clipping, then D-Adaptation: its state shards like the params
    _, shardings = train_lib.train_state_shardings(config, sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))
    assert shardings.opt_state[1].grad_sum["blocks"]["linear1"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_export_then_fine_tune_from_the_exported_checkpoint(tiny_t5, tmp_path):
    config = _config()
    mesh = _one_device()
    state, _ = _run(config, mesh, tiny_t5, [_batch(config, tiny_t5[2])], steps=2)
    train_lib.export_params(state, str(tmp_path / "ema"), config)
    train_lib.export_params(state, str(tmp_path / "bf16"), config, use_ema=False, dtype="bfloat16")
    saved = read_config(tmp_path / "bf16")
    assert saved["objective"] == "magnet" and saved["generate"]["span_len"] == config.masking.span_len == 3
    assert (
        saved["provenance"] == {"source": "magnet_jax training", "step": 2, "weights": "params", "dtype": "bfloat16"}
        and saved["model"]["param_dtype"] == "bfloat16"
    )

    config.train.init_from = str(tmp_path / "ema")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    tuned = train_lib.create_train_state(config, jax.random.key(99), mesh=sharding.make_mesh(config.mesh))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuned.params), jax.device_get(state.ema_params))
    assert int(tuned.step) == 0 and tuned.params["blocks"]["linear1"]["kernel"].sharding.spec[1] == "fsdp"

    config.train.init_from = str(tmp_path / "bf16")
    from_bf16 = train_lib.create_train_state(config, jax.random.key(0), mesh=sharding.make_mesh(config.mesh))
    expected = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), state.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_bf16.params), expected)

    config.model.subcodes_context = 3
    with pytest.raises(
        WeightsError, match="model.subcodes_context=5 but the training config has model.subcodes_context=3"
    ):
        train_lib.create_train_state(config, jax.random.key(0))


def test_eval_step_scores_every_stage_deterministically(tiny_t5):
    config = _config()
    mesh = _one_device()
    t5_config, t5_params, tokenizer = tiny_t5
    state = _initial_state(config, mesh)
    evaluate = train_lib.make_eval_step(config, mesh, t5_config)
    rules = sharding.logical_rules(config)
    t5_params = jax.device_put(t5_params, t5.param_shardings(t5_config, mesh, rules))
    batch = jax.device_put(_batch(config, tokenizer), sharding.batch_sharding(mesh, rules))
    first = jax.device_get(evaluate(state.params, t5_params, batch, jax.random.key(3)))
    again = jax.device_get(evaluate(state.params, t5_params, batch, jax.random.key(3)))
    assert jax.tree.map(float, first) == jax.tree.map(float, again)
    stages = [float(first[f"loss_stage{s}"]) for s in range(4)]
    assert all(np.isfinite(stages)) and len(set(stages)) == 4
    np.testing.assert_allclose(first["loss"], np.mean(stages), rtol=1e-6)


def test_fsdp8_state_memory_is_an_eighth_and_bfloat16_compute_keeps_float32_weights(tiny_t5):
    """Compiled memory analysis of the real train step on fsdp = 8 (state bytes per device <= 1.1 x total / 8);
    the same step computes in bfloat16 and keeps float32 master weights."""
    config = _config()
    config.model.dtype = "bfloat16"
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    rules = sharding.logical_rules(config)
    t5_config, t5_params, tokenizer = tiny_t5
    abstract, state_shardings = train_lib.train_state_shardings(config, mesh)
    t5_shardings = t5.param_shardings(t5_config, mesh, rules)
    batch = jax.device_put(_batch(config, tokenizer), sharding.batch_sharding(mesh, rules))
    step = train_lib.make_train_step(config, mesh, t5_config)
    compiled = step.lower(abstract, jax.eval_shape(lambda: t5_params), batch, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()

    def per_device(tree, shardings):
        return sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
        )

    total_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    state_per_device = per_device(abstract, state_shardings)
    others = (
        per_device(t5_params, t5_shardings)
        + sum(x.addressable_shards[0].data.nbytes for x in batch.values())
        + jax.random.key_data(jax.random.key(0)).nbytes
    )
    assert memory.argument_size_in_bytes == state_per_device + others  # the compiled step holds just this state
    ratio = state_per_device / (total_state / 8)
    print(f"state bytes: total {total_state}, per device {state_per_device} ({ratio:.3f} x total/8)")
    assert ratio <= 1.1

    state = _initial_state(config, mesh)
    t5_params = jax.device_put(t5_params, t5_shardings)
    for _ in range(3):
        state, metrics = compiled(state, t5_params, batch, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.ema_params))} == {jnp.dtype("float32")}
    assert _norm_rel_diff(state.params, _initial_state(config, _one_device()).params) > 1e-4


def test_flops_formula_matches_xla_cost_analysis():
    """Analytic FLOPs vs XLA's count of the lowered forward / gradient of an unscanned model (XLA also counts
    elementwise work and skips the gradient of the frozen text states: within 10%)."""
    config = LMConfig(dim=128, num_heads=4, num_layers=2, n_q=4, card=256, cond_dim=64, scan_layers=False)
    model = LanguageModel(config)
    params = jax.eval_shape(lambda k: nn.meta.unbox(init_params(model, k)), jax.random.key(0))
    batch, length, cond_len = 2, 64, 16
    codes = jnp.zeros((batch, 4, length), jnp.int32)
    states, mask = jnp.ones((batch, cond_len, 64)), jnp.ones((batch, cond_len), jnp.int32)

    def forward(p):
        return model.apply(
            {"params": p}, codes, model.apply({"params": p}, states, mask, method=model.project_condition)
        )

    counted_fwd = jax.jit(forward).lower(params).cost_analysis()["flops"]
    counted_train = jax.jit(jax.grad(lambda p: forward(p).sum())).lower(params).cost_analysis()["flops"]
    expected_fwd = flops.forward_flops(config, batch=batch, seq_len=length, cond_len=cond_len)
    expected_train = flops.train_flops(config, batch=batch, seq_len=length, cond_len=cond_len)
    assert expected_train == 3 * expected_fwd
    assert abs(counted_fwd / expected_fwd - 1) < 0.1 and abs(counted_train / expected_train - 1) < 0.1


def test_guided_decoding_pass_skips_the_null_rows_cross_attention_and_half_the_head_flops():
    """A CFG pass with B-row conditioning for 2B code rows: XLA counts the null rows' cross-attention FLOPs fewer
    than with a zero condition per null row, and with `guidance` the head's FLOPs of B rows fewer, as
    `decode_pass_flops` assumes; the formula is within 10% of the count."""
    config = LMConfig(dim=128, num_heads=4, num_layers=2, n_q=4, card=256, cond_dim=64, scan_layers=False)
    model = LanguageModel(config)
    params = jax.eval_shape(lambda k: nn.meta.unbox(init_params(model, k)), jax.random.key(0))
    batch, length, cond_len = 2, 64, 16
    codes = jnp.zeros((2 * batch, 4, length), jnp.int32)

    def counted(rows, guidance=None):
        """XLA's FLOPs of the pass with `rows`-row conditioning, its text keys/values (computed once) left out."""
        condition = jnp.ones((rows, cond_len, config.dim))

        def text_kv(p):
            return model.apply({"params": p}, condition, method=model.cross_key_values)

        def forward(p):
            kv = text_kv(p)
            return model.apply({"params": p}, codes, None, None, 0, cross_kv=kv, head=0, guidance=guidance)

        return (
            jax.jit(forward).lower(params).cost_analysis()["flops"]
            - jax.jit(text_kv).lower(params).cost_analysis()["flops"]
        )

    d = config.dim
    null_cross = batch * config.num_layers * (2.0 * length * 2 * d * d + 4.0 * d * length * cond_len)
    assert abs((counted(2 * batch) - counted(batch)) / null_cross - 1) < 0.05
    half_head = 2.0 * batch * length * d * config.card
    assert abs((counted(batch) - counted(batch, 3.0)) / half_head - 1) < 0.05
    expected = flops.decode_pass_flops(config, batch=batch, seq_len=length, cond_len=cond_len)
    assert abs(counted(batch, 3.0) / expected - 1) < 0.1

r"""audiocraft's unmerged `hybrid_magnet` branch (commit c44e943), the code of the released Hybrid-MAGNeT checkpoints
(`facebook/hybrid-magnet-small` / `-medium`), as the parity reference of our Hybrid-MAGNeT (docs/design.md §4.5, §11.4).

The branch is neither on PyPI nor reachable from CI, and its code is not copied into this repository. This module
  * writes tiny checkpoints exactly as the branch writes them: `xp.cfg` of its solver config
    `config/solver/magnet/hybrid_magnet_32khz.yaml` (composed like Hydra over `musicgen/default` and `lm/musicgen_lm`:
    `solver: hybrid_magnet`, `lm_model: transformer_lm_magnet`, delay pattern, non-causal), the MAGNeT LM's
    state-dict names, `compression_state_dict.bin` (`xp_cfg`, `release_state`, `write_release`);
  * given a checkout of the branch (`BRANCH_ENV` names it), runs the branch's own model code on top of the installed
    audiocraft 1.3.0 (`branch_lm`, `branch_logits`), loaded by audiocraft's `load_lm_model_magnet` (which the branch
    leaves unchanged) with the branch's model class in place of `MagnetLMModel`;
  * writes the golden file the CI test compares against when no checkout is available (`main`).

The branch is marked "hybrid magnet - unclean, not working yet": its model file does not run as committed.
`load_branch` executes it with the smallest corrections that make it run as its own comments and call sites say it
should (`FIXES`, each a literal replacement that must match exactly once, so a different commit fails loudly):
  1. the constructor calls the per-stage mask builder without its `num_heads` argument;
  2. the mask builder assigns a head-repeated, 8-aligned band `[1, H, T8, T8]` into a `[T, T]` block: the block
     gets the band's `[T, T]` corner (what the rows and columns of the block index);
  3. the mask builder shadows the module's alignment constant with a local that stage 0 never sets
     (UnboundLocalError): the module constant (8) is used;
  4. `forward` lacks the `condition_tensors` parameter that its body reads and every caller passes;
  5. `ar_generate` omits the `unconditional_state` argument of `LMModel._sample_next_token` (1.3.0 and the branch's
     base), shifting every sampling argument by one;
  6. (at run time, not a text edit) audiocraft's attention streams only causal self-attention and the hybrid model is
     non-causal, so `ar_generate` fails at its first step: `branch_ar_greedy` makes the self-attention causal for the
     AR phase, which is the attention the solver trains the prefix rows with.
The training mask of a sample with boundary b and stage k is the branch solver's (`_apply_nar_masks`): rows r < b
get its `compute_attn_mask` of the per-row decoding steps (run from the solver file, unchanged), the other rows the
stage-k mask `_stage_attn_mask(k, T, ...)`. The branch's MAGNeT-phase inference (`_generate_magnet`) cannot be run:
it calls the mask builder without `num_heads` once more, and past that it feeds the raw `[B, K, T]` frames to a model
whose masks and logit trimming are built for the `[B, K, T + K]` delay layout (attention crops the mask to the
sequence; the trimmed logits are K - 1 frames short of the tokens: a shape error at the first sampling step). magnet_jax
decodes with the training construction instead (README "Hybrid-MAGNeT releases").

Regenerate the golden file (after changing `CASES`, `ARCH` or `release_state`), from the repository root:

    git --git-dir=<audiocraft mirror> archive c44e943b9d12d666a9624516220c944a42c0f913 | tar -x -C /tmp/hybrid_branch
    python -m references.hybrid_magnet_branch --branch=/tmp/hybrid_branch

and run the test live against the checkout: `HYBRID_MAGNET_BRANCH=/tmp/hybrid_branch pytest
tests/checkpoints/test_hybrid_release.py`.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml

from magnet_jax.checkpoints.lm_weights import audiocraft_shapes
from magnet_jax.models.lm import LMConfig
from references import audiocraft_stubs

BRANCH_COMMIT = "c44e943b9d12d666a9624516220c944a42c0f913"
BRANCH_ENV = "HYBRID_MAGNET_BRANCH"  # path of a checkout (or `git archive`) of BRANCH_COMMIT
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "checkpoints" / "golden" / "hybrid_magnet_branch.npz"
MODEL_FILE = "audiocraft/models/lm_hybrid_magnet.py"
SOLVER_FILE = "audiocraft/solvers/hybrid_magnet.py"

ARCH = dict(dim=64, num_heads=4, num_layers=2, n_q=4, card=64, cond_dim=32)  # the tiny size of configs/magnet.py
WEIGHTS_SEED = 16
FRAMES = 20  # T of the logits cases: S = T + K = 24 layout steps
COND_LEN = 6
AR_FRAMES = 16  # whole frames of the greedy AR-phase check
CASES = ((0, 0), (5, 1), (11, 2), (17, 3), (3, 0))  # (boundary b, stage k) per case; b = 0 is MAGNeT alone

FIXES = (
    (
        "self._stage_attn_mask(stage, seq_len, device, dtype)",
        "self._stage_attn_mask(stage, seq_len, num_heads, device, dtype)",
    ),
    (
        "final_mask[stage:stage+seq_len, 1+stage:1+stage+seq_len] = sa_mask\n",
        "final_mask[stage:stage+seq_len, 1+stage:1+stage+seq_len] = "
        "sa_mask.reshape(-1, *sa_mask.shape[-2:])[0, :seq_len, :seq_len]\n",
    ),
    ("            MEMORY_EFFICIENT_ATTN_ALIGN_FACTOR = 8\n", ""),
    (
        "src_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:",
        "condition_tensors: tp.Optional[ConditionTensors] = None, "
        "src_mask: tp.Optional[torch.Tensor] = None) -> torch.Tensor:",
    ),
    (
        "curr_sequence, condition_tensors, use_sampling,",
        "curr_sequence, condition_tensors, self._uncond_state, use_sampling,",
    ),
)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints as the branch writes them (no branch code needed)


def xp_cfg(*, segment_duration: int = 30, **arch) -> str:
    """The `xp.cfg` YAML of a model trained with the branch's `solver=magnet/hybrid_magnet_32khz` (the keys audiocraft's
    loaders and builders read, with that config's values), for architecture `arch` (default `ARCH`)."""
    a = {**ARCH, **arch}
    cfg = {
        "device": "cuda",
        "dtype": "float16",
        "solver": "hybrid_magnet",
        "lm_model": "transformer_lm_magnet",
        "sample_rate": 32000,
        "channels": 1,
        "autocast": True,
        "autocast_dtype": "float16",
        "compression_model_checkpoint": "//pretrained/facebook/encodec_32khz",
        "efficient_attention_backend": "xformers",
        "dataset": {"segment_duration": segment_duration, "batch_size": 192, "sample_on_weight": False},
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": [],
            "cross": ["description"],
            "input_interpolate": [],
        },
        "conditioners": {
            "description": {
                "model": "t5",
                "t5": {"name": "t5-base", "finetune": False, "word_dropout": 0.3, "normalize_text": False},
            }
        },
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {"delays": list(range(a["n_q"])), "flatten_first": 0, "empty_initial": 0},
            "unroll": {"flattening": list(range(a["n_q"])), "delays": [0] * a["n_q"]},
            "music_lm": {"group_by": 2},
            "coarse_first": {"delays": [0, 0, 0]},
            "parallel": {"empty_initial": -1},
        },
        "transformer_lm": {
            "dim": a["dim"],
            "num_heads": a["num_heads"],
            "num_layers": a["num_layers"],
            "hidden_scale": 4,
            "n_q": a["n_q"],
            "card": a["card"],
            "dropout": 0.0,
            "emb_lr": None,
            "activation": "gelu",
            "norm_first": True,
            "bias_ff": False,
            "bias_attn": False,
            "bias_proj": False,
            "past_context": None,
            "causal": False,
            "custom": False,
            "memory_efficient": True,
            "attention_as_float32": False,
            "layer_scale": None,
            "positional_embedding": "sin",
            "xpos": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "norm": "layer_norm",
            "cross_attention": False,
            "qk_layer_norm": False,
            "qk_layer_norm_cross": False,
            "attention_dropout": None,
            "kv_repeat": 1,
            "two_step_cfg": False,
            "subcodes_context": 5,
            "compression_model_framerate": 50,
            "segment_duration": 0,
            "span_len": -1,
        },
        "masking": {"span_len": 3},
        "generate": {
            "lm": {
                "max_prompt_len": None,
                "max_gen_len": None,
                "remove_prompts": False,
                "use_sampling": True,
                "temp": 3.0,
                "top_k": 0,
                "top_p": 0.9,
                "max_cfg_coef": 10.0,
                "min_cfg_coef": 1.0,
                "decoding_steps": [60, 10, 10, 10],
                "anneal_temp": True,
                "span_scoring": "max",
                "span_arrangement": "nonoverlap",
                "prompted_samples": False,
                "samples": {"prompted": False, "unprompted": True},
            }
        },
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def release_state(seed: int = WEIGHTS_SEED, **arch) -> dict[str, np.ndarray]:
    """Random LM weights in audiocraft's names at the scale of a trained model (float32, NumPy's PCG64: the same on
    every machine): unit-variance embeddings, 1/sqrt(fan_in) projections, LayerNorm gains 1 ± 0.3 and biases ± 0.3,
    and output heads at 5/sqrt(dim), so the logits are confident and vary with position and context."""
    config = LMConfig(**{**ARCH, **arch})
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in audiocraft_shapes(config).items():
        if name.startswith("emb."):
            value = rng.standard_normal(shape)
        elif "norm" in name:
            value = (1.0 if name.endswith("weight") else 0.0) + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif name.startswith("linears."):
            value = 5.0 * rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        state[name] = value.astype(np.float32)
    return state


def write_release(directory: Path, state: dict, *, xp: str | None = None, dtype=torch.float32, codec: str = "") -> Path:
    """A hub-style release directory: `state_dict.bin` (`best_state`, `xp.cfg`, as audiocraft's export writes it) and
    `compression_state_dict.bin`, a pointer to `codec` (default: the xp.cfg's `facebook/encodec_32khz`)."""
    directory.mkdir(parents=True, exist_ok=True)
    best_state = {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in state.items()}
    torch.save(
        {"best_state": best_state, "xp.cfg": xp or xp_cfg(), "version": "1.3.0", "exported": True},
        directory / "state_dict.bin",
    )
    pointer = {"pretrained": codec or "facebook/encodec_32khz", "exported": True, "version": "1.3.0"}
    torch.save(pointer, directory / "compression_state_dict.bin")
    return directory


def cases(seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs of the logits cases, built like the branch solver's training inputs for each (b, k) of `CASES`: codebook q
    keeps its prefix frames t < b - q; codebook k is the mask id on random positions of its suffix t >= max(b - k, 0);
    codebooks above k are the mask id from their boundary on. Plus T5-like states and a padded conditioning mask."""
    rng = np.random.default_rng(seed)
    batch, (n_q, card) = 2, (ARCH["n_q"], ARCH["card"])
    codes = []
    for b, k in CASES:
        c = rng.integers(0, card, (batch, n_q, FRAMES))
        t, q = np.arange(FRAMES)[None, :], np.arange(n_q)[:, None]
        c = np.where((q > k) & (t >= b - q), card, c)
        suffix = t[0] >= max(b - k, 0)
        c[:, k] = np.where(suffix & (rng.random((batch, FRAMES)) < 0.6), card, c[:, k])
        codes.append(c)
    states = rng.standard_normal((batch, COND_LEN, ARCH["cond_dim"])).astype(np.float32)
    mask = np.array([[1] * COND_LEN, [1, 1, 1, 0, 0, 0]], np.int32)
    return {"codes": np.stack(codes).astype(np.int64), "states": states, "cond_mask": mask}


# ------------------------------------------------------------------------------------------------------------------
# The branch's code (needs a checkout)


@functools.cache
def load_branch(src: str | Path) -> tuple[types.ModuleType, types.FunctionType]:
    """(the branch's model module with `FIXES` applied, its solver's `compute_attn_mask`) from checkout `src`."""
    audiocraft_stubs.install()
    importlib.import_module("audiocraft.models.lm")
    src = Path(src)
    text = (src / MODEL_FILE).read_text()
    for old, new in FIXES:
        if text.count(old) != 1:
            raise ValueError(f"{src / MODEL_FILE}: expected one {old!r} (is it commit {BRANCH_COMMIT}?)")
        text = text.replace(old, new)
    name = "audiocraft.models.lm_hybrid_magnet"
    module = types.ModuleType(name)
    module.__file__, module.__package__ = str(src / MODEL_FILE), "audiocraft.models"
    sys.modules[name] = module
    exec(compile(text, str(src / MODEL_FILE), "exec"), module.__dict__)
    # the solver module imports the training stack (flashy, the MusicGen solver); only this method is needed
    solver = ast.parse((src / SOLVER_FILE).read_text())
    (cls,) = [n for n in solver.body if isinstance(n, ast.ClassDef) and n.name == "HybridMagnetSolver"]
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "compute_attn_mask"]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src / SOLVER_FILE), "exec"), namespace)
    return module, namespace["compute_attn_mask"]


def branch_lm(src: str | Path, release: Path, *, cond_dim: int = ARCH["cond_dim"]) -> torch.nn.Module:
    """The branch's `MagnetLMModel` for `release/state_dict.bin`, built by audiocraft's `load_lm_model_magnet` (strict
    `load_state_dict`) with the branch's class in place of the MAGNeT LM. The T5 conditioner is its only parameters,
    the `output_proj` from `cond_dim` (T5 itself is not in the file)."""
    module, _ = load_branch(src)
    from audiocraft.models import builders, loaders
    from audiocraft.modules.conditioners import BaseConditioner, ConditioningProvider

    saved = builders.MagnetLMModel, builders.get_conditioner_provider
    builders.MagnetLMModel = module.MagnetLMModel
    builders.get_conditioner_provider = lambda dim, cfg: ConditioningProvider(
        {"description": BaseConditioner(cond_dim, dim)}
    )
    try:
        return loaders.load_lm_model_magnet(str(release / "state_dict.bin"), compression_model_frame_rate=50)
    finally:
        builders.MagnetLMModel, builders.get_conditioner_provider = saved


def branch_mask(src: str | Path, lm: torch.nn.Module, boundary: int, stage: int, frames: int) -> torch.Tensor:
    """`[S, S]` additive training mask of the branch solver for one sample: rows r < boundary causal
    (`compute_attn_mask` of the decoding steps min(r, b)), the other rows `_stage_attn_mask(stage, frames)`."""
    _, compute_attn_mask = load_branch(src)
    steps = frames + lm.n_q
    nar = lm._stage_attn_mask(stage, frames, 1, torch.device("cpu"), torch.float32)
    seq = torch.arange(steps)[None]
    prefix = seq < boundary
    decoding_steps = prefix * seq + (~prefix) * boundary
    ar = compute_attn_mask(None, decoding_steps)[0, 0]
    return torch.where(prefix[0][:, None], ar, nar)


def branch_logits(src: str | Path, lm: torch.nn.Module, inputs: dict) -> np.ndarray:
    """Frame-aligned logits `[cases, B, K, T, card]` of the branch model: `compute_predictions` (delay pattern of
    T + K - 1 steps, revert, first T frames as the solver keeps) under `branch_mask` of each case."""
    with torch.no_grad():
        embeds = lm.condition_provider.conditioners["description"].output_proj(torch.from_numpy(inputs["states"]))
        mask = torch.from_numpy(inputs["cond_mask"])
        condition_tensors = {"description": (embeds * mask[..., None], mask)}
        out = []
        for (b, k), codes in zip(CASES, inputs["codes"]):
            src_mask = branch_mask(src, lm, b, k, codes.shape[-1])
            output = lm.compute_predictions(torch.from_numpy(codes), [], condition_tensors, src_mask=src_mask)
            out.append(output.logits[:, :, : codes.shape[-1]].numpy())
    return np.stack(out)


def branch_ar_greedy(src: str | Path, lm: torch.nn.Module, inputs: dict, frames: int = AR_FRAMES) -> np.ndarray:
    """The branch's AR phase (`ar_generate`, the main-branch key/value-cache loop on the delay pattern), greedy with
    CFG (`classifier_free_guidance.inference_coef` = 3), conditioned on row i's states `inputs["states"][i]`: `[B, K,
    frames]` whole frames. The T5 conditioner is stood in for by one that looks the rows' states up (same
    `output_proj`; a null description is all zeros with mask 0, as T5's empty text)."""
    load_branch(src)
    from audiocraft.modules.conditioners import ConditioningAttributes, TextConditioner

    states, masks = torch.from_numpy(inputs["states"]), torch.from_numpy(inputs["cond_mask"])

    class StatesConditioner(TextConditioner):
        def tokenize(self, x):
            return torch.tensor([len(states) if t is None else int(t) for t in x])

        def forward(self, rows):
            table = torch.cat([states, torch.zeros_like(states[:1])])
            mask = torch.cat([masks, torch.zeros_like(masks[:1])])[rows]
            return self.output_proj(table[rows]) * mask[..., None], mask

    original = lm.condition_provider.conditioners["description"]
    stand_in = StatesConditioner(states.shape[-1], original.output_proj.out_features)
    stand_in.output_proj.load_state_dict(original.output_proj.state_dict())
    lm.condition_provider.conditioners["description"] = stand_in
    self_attention = [layer.self_attn for layer in lm.transformer.layers]
    for attention in self_attention:  # audiocraft streams causal attention only (see the module docstring, 6.)
        attention.causal = True
    try:
        conditions = [ConditioningAttributes(text={"description": str(i)}) for i in range(len(states))]
        codes = lm.ar_generate(None, conditions, num_samples=len(states), max_gen_len=frames, use_sampling=False)
    finally:
        lm.condition_provider.conditioners["description"] = original
        for attention in self_attention:
            attention.causal = False
    return codes.numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="write the Hybrid-MAGNeT golden file from a branch checkout")
    parser.add_argument("--branch", required=True, help=f"checkout (or git archive) of audiocraft {BRANCH_COMMIT}")
    parser.add_argument("--output", default=str(GOLDEN))
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        release = write_release(Path(tmp) / "release", release_state())
        lm = branch_lm(args.branch, release)
        inputs = cases()
        logits = branch_logits(args.branch, lm, inputs)
        ar_codes = branch_ar_greedy(args.branch, lm, inputs)
    probs = torch.softmax(torch.from_numpy(logits), -1).max(-1).values
    print(f"logits std {logits.std():.2f}, median max-probability {probs.median():.2f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        logits=logits.astype(np.float32),
        ar_codes=ar_codes.astype(np.int32),
        boundaries_stages=np.array(CASES, np.int32),
        weights_seed=np.int64(WEIGHTS_SEED),
        commit=np.array(BRANCH_COMMIT),
        **inputs,
    )
    print(f"wrote {args.output} ({Path(args.output).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

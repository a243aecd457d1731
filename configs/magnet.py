r"""MAGNeT training/model config.

Presets come from the arg string, single fields from flags:

  python -m magnet_jax.train --config=configs/magnet.py:size=small,duration=10,task=music \
      --config.optim.lr=1e-4 --config.mesh.fsdp=8

Preset options:
  size:     tiny | small (1024/24/16) | medium (1536/48/24) | large (2048/48/32)
  duration: segment seconds (10 or 30 for the released models)
  task:     music (32 kHz EnCodec, t5-base) | sound (16 kHz EnCodec, t5-large)
  objective: magnet (default) | hybrid (Hybrid-MAGNeT: autoregressive prefix + MAGNeT on the delay layout)

Derived values are FieldReferences, so overriding `data.segment_seconds` also changes `data.seq_len`, and
overriding `codec.card` changes `model.card`.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from magnet_jax import sharding
from magnet_jax.evaluation import scoring

SIZES = {  # dim, heads, layers (audiocraft config/model/lm/model_scale/*.yaml); tiny is for tests/quickstart
    "tiny": (64, 4, 2),
    "small": (1024, 16, 24),
    "medium": (1536, 24, 48),
    "large": (2048, 32, 48),
}

# EnCodec architectures (docs/design.md §9). `ratios` are in decoder order; hop = prod(ratios).
CODECS = {
    "music": dict(
        source="facebook/encodec_32khz",
        sample_rate=32000,
        ratios=(8, 5, 4, 4),
        n_filters=64,
        dimension=128,
        card=2048,
        n_q=4,
        num_lstm_layers=2,
        pad_mode="constant",
    ),
    "sound": dict(
        source="facebook/audio-magnet-small",
        sample_rate=16000,
        ratios=(8, 5, 4, 2),
        n_filters=64,
        dimension=128,
        card=2048,
        n_q=4,
        num_lstm_layers=2,
        pad_mode="constant",
    ),
    # Small codec the quickstart creates locally (no downloads); 50 Hz like the real one.
    "tiny": dict(
        source="",
        sample_rate=32000,
        ratios=(8, 5, 4, 4),
        n_filters=4,
        dimension=16,
        card=64,
        n_q=4,
        num_lstm_layers=2,
        pad_mode="constant",
    ),
}

TEXT_ENCODERS = {  # hub id / dir, d_model
    "music": ("t5-base", 768),
    "sound": ("t5-large", 1024),
    "tiny": ("", 32),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, size="small", duration=10.0, task="music", objective="magnet")
    if arg.size not in SIZES:
        raise ValueError(f"size={arg.size!r}: expected one of {', '.join(SIZES)}")
    if arg.task not in ("music", "sound"):
        raise ValueError(f"task={arg.task!r}: expected music or sound")
    if arg.objective not in ("magnet", "hybrid"):
        raise ValueError(f"objective={arg.objective!r}: expected magnet or hybrid")
    tiny = arg.size == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- audio codec -----------------------------------------------------------------------------------
    codec = dict(CODECS["tiny" if tiny else arg.task])
    hop = 1
    for r in codec["ratios"]:
        hop *= r
    c.codec = ml_collections.ConfigDict(codec)
    c.codec.ratios = list(codec["ratios"])
    c.codec.frame_rate = codec["sample_rate"] // hop  # derived from the preset's sample rate and strides
    c.codec.n_residual_layers = 1
    c.codec.compress = 2
    c.codec.dtype = "float32"
    c.codec.chunk_seconds = 10.0  # long audio is encoded in fixed chunks so memory stays flat

    # --- language model --------------------------------------------------------------------------------
    dim, heads, layers = SIZES[arg.size]
    c.model = ml_collections.ConfigDict()
    c.model.dim = dim
    c.model.num_heads = heads
    c.model.num_layers = layers
    c.model.hidden_scale = 4
    c.model.n_q = c.codec.get_ref("n_q")
    c.model.card = c.codec.get_ref("card")
    c.model.causal = False  # MAGNeT; MusicGen is the same module with causal=True
    c.model.subcodes_context = 5  # restricted band |i-j| <= 5 for stages >= 1
    c.model.norm_eps = 1e-5
    c.model.max_period = 10000.0
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.model.param_dtype = "float32"
    c.model.remat = False  # nn.remat each block
    c.model.scan_layers = True  # nn.scan over blocks (fast compile for 48 layers)
    # attention kernel: splash on TPU, cuDNN on GPU for 16-bit compute, else XLA; or "xla" / "cudnn" / "splash"
    c.model.attention = "auto"

    # --- text conditioning -----------------------------------------------------------------------------
    t5, t5_dim = TEXT_ENCODERS["tiny" if tiny else arg.task]
    c.conditioner = ml_collections.ConfigDict()
    c.conditioner.t5 = t5  # hub id or local directory (weights + tokenizer)
    c.conditioner.t5_dim = t5_dim
    c.conditioner.max_length = 256  # tokens incl. EOS; longer descriptions keep their first max_length-1 tokens
    c.conditioner.dtype = "float32"
    c.conditioner.word_dropout = 0.3 if arg.task == "music" else 0.0
    c.conditioner.cfg_dropout = 0.3 if arg.task == "music" else 0.1
    c.model.cond_dim = c.conditioner.get_ref("t5_dim")

    # --- masking objective -----------------------------------------------------------------------------
    c.masking = ml_collections.ConfigDict()
    c.masking.span_len = 3

    # --- optimisation ----------------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    # The reference trains small with D-Adaptation Adam (lr 1) and medium with AdamW (lr 1e-4).
    c.optim.name = "dadam" if arg.size == "small" else "adamw"
    c.optim.lr = 1.0 if arg.size == "small" else 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 20 if tiny else 4000
    c.optim.lr_min_ratio = 0.0
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 1
    c.optim.ema_decay = 0.99
    c.optim.ema_every = 10

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 200 if tiny else 1_000_000
    c.train.log_every = 10 if tiny else 100
    c.train.eval_every = 100 if tiny else 5000
    c.train.eval_steps = 2 if tiny else 20
    c.train.profile_start = -1  # step at which a jax.profiler trace starts (-1: off)
    c.train.profile_steps = 5
    c.train.init_from = ""  # converted checkpoint dir to fine-tune from ("" = scratch init)
    c.train.objective = arg.objective  # "magnet" or "hybrid" (Hybrid-MAGNeT: AR prefix + MAGNeT, delay layout)
    # Audio metrics every eval_every steps (README "Evaluation"): generate the fixed prompt set with the EMA weights
    # (the `generate` section's settings, seed eval_seed), score it, log split "eval_audio". () = off.
    c.train.eval_metrics = ()  # subset of ("fad", "kl", "clap")
    c.train.eval_prompts = ""  # captions file (.csv ytid,caption | .jsonl | .txt), a small fixed set
    c.train.eval_reference = ""  # reference audio directory or statistics .npz (fad, kl)
    c.train.eval_seed = 0
    c.train.eval_audio = scoring.embedder_config()  # the embedders' weight files (the user's copies)
    # Divergence guard (magnet_jax.training.guard): stop with exit status 3 after more than this many consecutive
    # skipped (non-finite) updates, or consecutive losses above spike_factor x the median of the last spike_window
    # losses. 0 turns a check off.
    c.train.max_skipped_in_a_row = 10
    c.train.spike_factor = 3.0
    c.train.spike_window = 200
    c.train.max_spikes_in_a_row = 50
    c.optim.total_steps = c.train.get_ref("num_steps")

    # --- device mesh (data, fsdp, tensor); one ICI degree may be -1 = the rest ----------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # multi-slice: degrees across slices (data-centre network)
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1
    c.sharding_rules = list(sharding.DEFAULT_RULES)  # logical axis -> mesh axes

    # --- data ------------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # ArrayRecord shards (glob), written by data_pipelines.encode_audio
    c.data.eval_files = ""
    c.data.segment_seconds = float(arg.duration)
    c.data.seq_len = (c.data.get_ref("segment_seconds") * c.codec.get_ref("frame_rate")).to_int()
    c.data.batch_size = 8 if tiny else (576 if arg.duration <= 10 else 192)  # global batch
    c.data.shuffle_seed = 0
    c.data.worker_count = 0  # grain multiprocessing workers (0 = in-process)
    # A record that does not decode or holds codes outside [0, codec.card): "fail" (one line naming shard and
    # record, exit 2) or "skip" (a warning naming it, the next record takes its place, a count at the end).
    c.data.on_bad_record = "fail"
    c.data.prefetch = 4
    c.data.merge_text_p = 0.25  # metadata merge into descriptions (docs/design.md §3); 0 disables
    c.data.drop_desc_p = 0.5
    c.data.drop_other_p = 0.5

    # --- checkpoints -----------------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100 if tiny else 1000
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 0 if tiny else 50_000  # also keep every K steps (0 = off)
    c.checkpoint.async_save = True
    c.checkpoint.export_bf16 = False
    # A step that fails verification (checksums, unreadable files, non-finite state) on resume: "fallback" skips it
    # (one warning line, moved to checkpoints.corrupt/) and resumes from the newest step that verifies; "fail" stops.
    c.checkpoint.on_corrupt = "fallback"

    # --- generation ------------------------------------------------------------------------------------
    c.generate = ml_collections.ConfigDict()
    first = max(1, int(20 * arg.duration / 10))
    c.generate.decoding_steps = [first, 10, 10, 10]
    c.generate.temperature = 3.0 if arg.task == "music" else 3.5
    c.generate.anneal_temp = True
    c.generate.top_p = 0.9 if arg.task == "music" else 0.8
    c.generate.top_k = 0
    c.generate.use_sampling = True
    c.generate.max_cfg = 10.0 if arg.task == "music" else 20.0
    c.generate.min_cfg = 1.0
    c.generate.span_arrangement = "nonoverlap"  # or "stride1"
    c.generate.span_scoring = "max"  # or "prod"
    c.generate.duration = c.data.get_ref("segment_seconds")
    return c

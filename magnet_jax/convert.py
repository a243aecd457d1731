r"""Converts LM checkpoints between the released formats and ours.

  # released weights (hub id, directory or file; audiocraft state_dict.bin or transformers MusicGen) -> ours
  python -m magnet_jax.convert --src=facebook/magnet-small-10secs --dst=checkpoints/magnet-small-10secs
  # Hybrid-MAGNeT releases (audiocraft branch hybrid_magnet) -> ours, config.json "objective": "hybrid"
  python -m magnet_jax.convert --src=facebook/hybrid-magnet-small --dst=checkpoints/hybrid-magnet-small
  # ours -> audiocraft (state_dict.bin + compression_state_dict.bin pointer), loadable by audiocraft's loaders
  python -m magnet_jax.convert --src=checkpoints/my-run-export --dst=exported/my-magnet --to=audiocraft

The model config always comes from the source (`xp.cfg` / `config.json`). Output is written atomically; on bad input
the command prints one line naming the file/key and exits with status 2, leaving nothing under `--dst`. `--src` may
also be a training workdir (its export, else the EMA params of its newest checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from magnet_jax.checkpoints import lm_weights, pretrained
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.cli import fail, parse_flags, quiet_logs
from magnet_jax.fileio import WeightsError, absolute_path, check_writable, local_source

DTYPES = ("float32", "bfloat16", "float16")

_SRC = flags.DEFINE_string("src", None, "hub id, directory or file to convert")
_DST = flags.DEFINE_string("dst", None, "output directory")
_TO = flags.DEFINE_enum("to", "jax", ["jax", "audiocraft"], "output format")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    DTYPES,
    "cast the weights (default: released weights -> float32, a "
    "converted checkpoint keeps its dtype, audiocraft output float32)",
)
_SCAN = flags.DEFINE_bool("scan_layers", True, "jax output: stack the transformer layers (nn.scan layout)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


def convert(
    src: str, dst: str, *, to: str = "jax", dtype: str | None = None, scan_layers: bool = True, overwrite: bool = False
) -> Path:
    """Converts `src` into `dst` (paths relative to the working directory or `~`); returns `dst`, absolute. Raises
    WeightsError on bad input (nothing written)."""
    src, dst = local_source(src), absolute_path(dst)
    if Path(dst).exists() and not overwrite:
        raise WeightsError(f"{dst} already exists (pass --overwrite to replace it)")
    try:  # before the weights load
        check_writable(dst, what="--dst")
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if to == "jax":
        config, params = load_lm(src, dtype=dtype, scan_layers=scan_layers)
        pretrained.save_pretrained(dst, params, config, overwrite=overwrite)
    elif to == "audiocraft":
        config, params = load_lm(src)
        lm_weights.export_audiocraft(dst, params, config, dtype=dtype or "float32", overwrite=overwrite)
    else:
        raise WeightsError(f"--to={to!r}: expected jax or audiocraft")
    return Path(dst)


def main(argv):
    del argv
    quiet_logs()
    if not _SRC.value or not _DST.value:
        fail("convert", "--src and --dst are required")
    try:
        out = convert(
            _SRC.value,
            _DST.value,
            to=_TO.value,
            dtype=_DTYPE.value,
            scan_layers=_SCAN.value,
            overwrite=_OVERWRITE.value,
        )
    except WeightsError as e:
        fail("convert", str(e))
    print(f"wrote {out} ({_TO.value})")


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: parse_flags(argv, prog="convert"))

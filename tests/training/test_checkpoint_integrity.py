"""Checkpoint integrity under fault injection: real orbax checkpoints damaged on disk (a flipped bit, a truncated or
emptied file, a stray empty step folder, an interrupted save) are detected by their checksum manifests, reported in
one line naming the step and the file, and skipped; a restored state with NaN is refused; the params export
verifies the same way."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs.magnet import get_config
from magnet_jax.checkpoints import pretrained
from magnet_jax.fileio import CHECKSUMS_FILE, IntegrityError, WeightsError, verify_checksums, write_checksums
from magnet_jax.training import checkpointing


def checkpoint_config(**overrides):
    config = get_config("size=tiny")
    config.checkpoint.update({"every_steps": 1, "keep": 5, "async_save": True, **overrides})
    return config


def save_steps(directory, values, config=None):
    """Saves `{'w': [4] float32 = v, 'n': int32 step}` for steps 1.. len(values), asynchronously, then closes."""
    config = config or checkpoint_config()
    ckpt = checkpointing.Checkpointer(str(directory), config.checkpoint)
    for step, value in enumerate(values, start=1):
        assert ckpt.save(step, {"w": np.full((4,), value, np.float32), "n": np.asarray(step, np.int32)}, None, config)
    ckpt.close()


TARGET = {"w": np.zeros((4,), np.float32), "n": np.zeros((), np.int32)}


def restore(directory, config=None, **kw):
    config = config or checkpoint_config()
    ckpt = checkpointing.Checkpointer(str(directory), config.checkpoint)
    try:
        state = ckpt.restore(TARGET, None, config, **kw)
        return state, getattr(ckpt, "restored_step", None)
    finally:
        ckpt.close()


def state_data_file(step_dir: Path) -> Path:
    """The largest file of a step's `state` item (an OCDBT data file holding the arrays)."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bit(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_saved_step_is_sealed_with_a_checksum_manifest(tmp_path):
    save_steps(tmp_path, [1.0, 2.0, 3.0])
    for step in (1, 2, 3):
        manifest = json.loads((tmp_path / str(step) / CHECKSUMS_FILE).read_text())
        listed = set(manifest["files"])
        on_disk = {str(p.relative_to(tmp_path / str(step))) for p in (tmp_path / str(step)).rglob("*") if p.is_file()}
        assert listed == on_disk - {CHECKSUMS_FILE}
        assert any(name.startswith("state/") for name in listed) and "config/metadata" in listed
        assert verify_checksums(tmp_path / str(step)) == manifest["digest"]
    state, step = restore(tmp_path)
    assert step == 3 and float(state["w"][0]) == 3.0


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("flip", r"state/.*: SHA-256 differs from checksums.json \(damaged\)"),
        ("truncate", r"state/.*: \d+ bytes, checksums.json lists \d+"),
        ("delete", r"state/.*: missing \(listed in checksums.json\)"),
        ("empty_config", r"3/config/metadata: 0 bytes, checksums.json lists \d+"),
        ("no_manifest", r"3/checksums.json: missing \(the write did not complete\)"),
    ],
)
def test_a_damaged_newest_step_is_skipped_and_the_older_one_restored(tmp_path, damage, expected, caplog):
    save_steps(tmp_path, [1.0, 2.0, 3.0])
    step3 = tmp_path / "3"
    target = state_data_file(step3)
    if damage == "flip":
        flip_bit(target, offset=len(target.read_bytes()) // 2)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "delete":
        target.unlink()
    elif damage == "empty_config":
        (step3 / "config" / "metadata").write_text("")
    else:
        (step3 / CHECKSUMS_FILE).unlink()

    with pytest.raises(checkpointing.CheckpointError, match=expected) as failed:
        restore(tmp_path, checkpoint_config(on_corrupt="fail"))
    assert "\n" not in str(failed.value) and "on_corrupt='fail'" in str(failed.value)
    assert step3.is_dir()  # 'fail' leaves the workdir as it was

    with caplog.at_level("WARNING"):
        state, step = restore(tmp_path)
    assert step == 2 and float(state["w"][0]) == 2.0
    warnings = [r.getMessage() for r in caplog.records if "skipping step 3" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert not step3.exists() and len(list((tmp_path.parent / f"{tmp_path.name}.corrupt").iterdir())) == 1


def test_a_stray_empty_step_folder_and_orbax_temporaries_do_not_block_resuming(tmp_path):
    save_steps(tmp_path, [1.0, 2.0])
    (tmp_path / "70").mkdir()
    (tmp_path / "3.orbax-checkpoint-tmp-1733000000").mkdir()
    (tmp_path / "3.orbax-checkpoint-tmp-1733000000" / "state").mkdir()
    state, step = restore(tmp_path)
    assert step == 2 and float(state["w"][0]) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_step_with_non_finite_values_is_refused(tmp_path):
    save_steps(tmp_path, [1.0, float("nan")])
    with pytest.raises(checkpointing.CheckpointError, match=r"2/state: non-finite values in \['w'\]"):
        restore(tmp_path, step=2)
    state, step = restore(tmp_path)
    assert step == 1 and float(state["w"][0]) == 1.0


def test_no_verifying_step_means_a_fresh_start(tmp_path):
    save_steps(tmp_path, [1.0])
    flip_bit(state_data_file(tmp_path / "1"))
    assert restore(tmp_path) == (None, None)
    assert not (tmp_path / "1").exists()


def test_a_failed_save_is_one_line_naming_the_step(tmp_path):
    config = checkpoint_config()
    directory = tmp_path / "ckpt"
    ckpt = checkpointing.Checkpointer(str(directory), config.checkpoint)
    ckpt.save(1, {"w": np.ones((4,), np.float32)}, None, config)
    ckpt.wait_until_finished()
    shutil.rmtree(directory)
    directory.write_text("the disk was swapped")  # every write under it fails with an OS error
    with pytest.raises(checkpointing.CheckpointError, match=r"ckpt/2: saving the checkpoint failed \(NotADirectory"):
        ckpt.save(2, {"w": np.ones((4,), np.float32)}, None, config)
        ckpt.close()  # an asynchronous save reports its failure at the next save or at close


def test_directory_checksums_name_an_unlisted_file(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    write_checksums(tmp_path)
    (tmp_path / "b").write_bytes(b"y")
    with pytest.raises(IntegrityError, match=r"/b: not listed in checksums.json"):
        verify_checksums(tmp_path)


def test_a_damaged_params_export_is_refused_naming_the_file(tiny, tmp_path):
    config, params = pretrained.load_pretrained(tiny["lm"])
    export = tmp_path / "export"
    pretrained.save_pretrained(export, params, config)
    assert (export / CHECKSUMS_FILE).is_file()
    pretrained.load_pretrained(export)  # verifies
    data = max((p for p in (export / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip_bit(data, offset=data.stat().st_size // 2)
    with pytest.raises(WeightsError, match=rf"{data.name}: SHA-256 differs"):
        pretrained.load_pretrained(export)

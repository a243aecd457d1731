"""The quickstart's objective check on a reduced budget: a tiny MAGNeT trained with the quickstart's own settings
(`SHORT_RUN` and `SAMPLING` of launch/quickstart.sh) follows its prompts' brightness ("bright sawtooth" / "soft
sine") clearly more often than an untrained one, over several sampling seeds, and its held-out loss from the text
rises when the descriptions' drums are swapped."""

import re
from pathlib import Path

import numpy as np

from data_pipelines import quickstart_report
from data_pipelines.make_tiny_assets import make_assets, make_random_lm

ROOT = Path(__file__).resolve().parents[2]
TINY_CODEC = ROOT / "data_pipelines" / "tiny_codec"
SECONDS = 2.0


def quickstart_overrides(name: str) -> dict[str, str]:
    """`{dotted config field: value}` of the bash array `name=(--config.a.b=v ...)` in launch/quickstart.sh."""
    script = (ROOT / "launch" / "quickstart.sh").read_text()
    body = re.search(rf"^{name}=\((.*?)\)", script, re.S | re.M)
    assert body, f"launch/quickstart.sh: no {name}=(...) array"
    return dict(re.findall(r"--config\.([\w.]+)=(\S+)", body.group(1)))


def apply(config, overrides: dict[str, str]) -> None:
    for field, value in overrides.items():
        *path, leaf = field.split(".")
        section = config
        for part in path:
            section = section[part]
        section[leaf] = type(section[leaf])(float(value))


def brightness_rate(model, specs: dict, texts: list[str], seeds) -> float:
    hits = []
    for seed in seeds:
        audio = model.generate(texts, seed=seed).audio
        results = quickstart_report.measure_adherence(specs, {k: audio[i, 0] for i, k in enumerate(specs)})
        hits += [r["brightness"] for r in results.values()]
    return float(np.mean(hits))


def test_trained_tiny_magnet_follows_brightness_better_than_an_untrained_one(encoded_splits, tmp_path):
    from configs.magnet import get_config
    from magnet_jax import train
    from magnet_jax.api import MAGNeT

    encoded_splits(tmp_path, TINY_CODEC, (32, 8), SECONDS, SECONDS, 64)
    assets = make_assets(tmp_path / "audio_train", tmp_path / "assets", codec=TINY_CODEC)
    c = get_config(f"size=tiny,duration={SECONDS}")
    c.data.train_files = str(tmp_path / "codes_train" / "*.array_record")
    c.data.eval_files = str(tmp_path / "codes_eval" / "*.array_record")
    c.conditioner.t5, c.codec.source = str(assets["t5"]), str(assets["codec"])
    c.conditioner.max_length = 48
    apply(c, quickstart_overrides("SHORT_RUN"))
    c.optim.warmup_steps = 25
    c.train.update(num_steps=250, log_every=50, eval_every=250, eval_steps=1)
    train.train_and_evaluate(c, str(tmp_path / "run"))

    sampling = {k.split(".", 1)[1]: float(v) for k, v in quickstart_overrides("SAMPLING").items()}
    drawn = quickstart_report.prompt_specs()
    specs = quickstart_report.spec_table(drawn, SECONDS)
    texts = [spec.description() for spec in drawn]
    rates = {}
    for name, source in (
        ("trained", tmp_path / "run"),
        ("untrained", make_random_lm(tmp_path / "untrained", assets, segment_seconds=SECONDS)),
    ):
        model = MAGNeT.from_pretrained(str(source))
        model.set_generation_params(**sampling)
        rates[name] = brightness_rate(model, specs, texts, seeds=(0, 1, 2))
    print(f"brightness follows the prompt: {rates}")
    assert rates["trained"] >= 0.7 and rates["trained"] >= rates["untrained"] + 0.2, rates
    loss = quickstart_report.description_sensitivity(tmp_path / "run", str(tmp_path / "codes_eval" / "*.array_record"))
    print(f"held-out codebook-0 loss from the text, per swapped property: {loss}")
    assert loss["drums"] > loss["true"] + 0.05 and loss["none"] > loss["true"] + 0.05, loss

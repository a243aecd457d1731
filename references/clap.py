"""The laion_clap 1.1.7 reference of the CLAP parity tests and benchmark, built offline with random weights.

laion_clap is installed with --no-deps (it pins numpy<2). Its code path for embeddings needs torch, transformers,
torchlibrosa and librosa (the STFT window and mel bank), all real. At import time it also loads modules it never
uses here: torchvision (no PyPI wheel imports beside this torch build), webdataset, wget, h5py, pandas, ftfy,
braceexpand (training data, the CLIP tokenizer); those are stubbed in the style of references/audiocraft_stubs.py
(anything taken from them raises when called). And it downloads at construction: `RobertaTokenizer`,
`BertTokenizer` and `BartTokenizer.from_pretrained(...)` when training/data.py is imported, `RobertaModel.
from_pretrained("roberta-base")` in `CLAP.__init__`. `offline_pretrained` answers those from local files: the
RoBERTa tokenizer from a directory with vocab.json + merges.txt, `RobertaModel(config)` with fresh weights (they are
replaced by `randomize` and saved), and the unused BERT/BART tokenizers as placeholders that raise when called.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from references import audiocraft_stubs

# transformers' roberta-base config.json (the fields RobertaModel reads)
ROBERTA_BASE = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
}
_IMPORT_ONLY = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.datasets",
    "torchvision.ops",
    "torchvision.ops.misc",
    "webdataset",
    "wget",
    "h5py",
    "pandas",
    "ftfy",
    "braceexpand",
)


def _import_laion_clap() -> None:
    """Imports laion_clap with its import-only dependencies stubbed for the duration of the import only (transformers
    probes for torchvision and must keep seeing it absent: its answer is cached, so it is asked first)."""
    if "laion_clap" in sys.modules:
        return
    import transformers
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    for name in ("RobertaModel", "BertModel", "BartModel", "RobertaTokenizer", "BertTokenizer", "BartTokenizer"):
        getattr(transformers, name)
    importlib.import_module("transformers.tokenization_utils_base")
    added = [name for name in _IMPORT_ONLY if not audiocraft_stubs._importable(name)]
    for name in added:
        module = audiocraft_stubs._stub(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    try:
        importlib.import_module("laion_clap")
    finally:
        for name in added:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def offline_pretrained(tokenizer_dir: str | Path, roberta: dict, htsat=None):
    """Patches laion_clap's downloads (see the module doc); `htsat` (a `clap_audio.HtsatConfig`) replaces the
    HTSAT-base preset's dimensions with smaller ones of the same architecture."""
    import transformers

    from_pretrained = transformers.RobertaTokenizer.from_pretrained

    def tokenizer(name, *args, **kwargs):
        if name == "roberta-base":
            return from_pretrained(str(tokenizer_dir))
        return audiocraft_stubs._Unavailable(f"{name} tokenizer")

    def model(name, *args, **kwargs):
        assert name == "roberta-base", name
        return transformers.RobertaModel(transformers.RobertaConfig(**roberta))

    with contextlib.ExitStack() as stack:
        for cls in (transformers.RobertaTokenizer, transformers.BertTokenizer, transformers.BartTokenizer):
            stack.enter_context(mock.patch.object(cls, "from_pretrained", tokenizer))
        stack.enter_context(mock.patch.object(transformers.RobertaModel, "from_pretrained", model))
        _import_laion_clap()
        if htsat is not None:
            factory, model_module = sys.modules["clap_module.factory"], sys.modules["clap_module.model"]
            htsat_module = sys.modules["clap_module.htsat"]

            def create_htsat(audio_cfg, enable_fusion=False, fusion_type="None"):
                return htsat_module.HTSAT_Swin_Transformer(
                    spec_size=256,
                    patch_size=4,
                    patch_stride=(4, 4),
                    num_classes=audio_cfg.class_num,
                    embed_dim=htsat.embed_dim,
                    depths=list(htsat.depths),
                    num_heads=list(htsat.num_heads),
                    window_size=htsat.window_size,
                    config=audio_cfg,
                    enable_fusion=enable_fusion,
                    fusion_type=fusion_type,
                )

            configs = dict(factory._MODEL_CONFIGS)
            configs["HTSAT-base"] = {**configs["HTSAT-base"], "embed_dim": htsat.num_features}
            stack.enter_context(mock.patch.object(factory, "_MODEL_CONFIGS", configs))
            stack.enter_context(mock.patch.object(model_module, "create_htsat_model", create_htsat))
        yield


def randomize(model, seed: int = 0) -> None:
    """Realistic random weights for laion_clap's `CLAP`: Linear/conv weights N(0, 1/fan_in), biases and position
    bias tables N(0, 0.1^2 ... 0.5^2), LayerNorm/BatchNorm affine 1 + N(0, 0.1^2) / N(0, 0.1^2), bn0 running
    statistics of log-mel dB values (mean -40 +- 10, std 10..25); the frozen STFT/mel matrices and buffers kept."""
    import torch

    rng = np.random.default_rng(seed)
    frozen = ("spectrogram_extractor", "logmel_extractor")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f in name for f in frozen):
                continue
            shape = tuple(p.shape)
            if name.endswith("relative_position_bias_table") or p.ndim >= 2 and "embeddings" in name:
                value = 0.5 * rng.standard_normal(shape)
            elif p.ndim >= 2:  # Linear [out, in], Conv [out, in, kh, kw]
                value = rng.standard_normal(shape) * float(np.prod(shape[1:])) ** -0.5
            elif name.endswith("weight"):  # LayerNorm / BatchNorm scale
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                value = 0.1 * rng.standard_normal(shape)
            p.copy_(torch.from_numpy(np.asarray(value, np.float32)))
        bn = model.audio_branch.bn0
        bn.running_mean.copy_(
            torch.from_numpy((-40.0 + 10.0 * rng.standard_normal(bn.num_features)).astype(np.float32))
        )
        bn.running_var.copy_(torch.from_numpy((rng.uniform(10.0, 25.0, bn.num_features) ** 2).astype(np.float32)))


def save_released_format(model, path: str | Path, *, prefix: str = "module.", wrapped: bool = True) -> Path:
    """Writes `model.state_dict()` as laion_clap's training checkpoints are released: `{"epoch", "name",
    "state_dict": {"module." + key}, "optimizer"}`, with transformers 4.x's persistent `position_ids` buffer."""
    import torch

    state = dict(model.state_dict())
    state["text_branch.embeddings.position_ids"] = torch.arange(model.text_branch.config.max_position_embeddings)[None]
    state = {prefix + k: v for k, v in state.items()}
    obj = state
    if wrapped:
        obj = {
            "epoch": 15,
            "name": "random-test",
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "params": [0, 1]}]},
        }
    torch.save(obj, str(path))
    return Path(path)


def build_reference(tokenizer_dir, *, roberta: dict = ROBERTA_BASE, htsat=None, seed: int = 0):
    """A `laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base")` with `randomize`d weights (eval)."""
    audiocraft_stubs.install()
    with offline_pretrained(tokenizer_dir, roberta, htsat):
        import laion_clap

        module = laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base", device="cpu")
    randomize(module.model, seed)
    return module.eval()


def audiocraft_metric(checkpoint, tokenizer_dir, *, roberta: dict = ROBERTA_BASE, htsat=None):
    """audiocraft's `CLAPTextConsistencyMetric` for `checkpoint`, model loaded by its own `_initialize_model`
    (`load_clap_state_dict`); torchmetrics is stubbed, so its two states are set as `add_state` would."""
    import torch

    audiocraft_stubs.install()
    with offline_pretrained(tokenizer_dir, roberta, htsat):
        from audiocraft.metrics import clap_consistency
        from audiocraft.metrics.clap_consistency import CLAPTextConsistencyMetric

        # audiocraft binds `laion_clap = None` when its metrics package was imported before laion_clap could be
        # (audiocraft.data.music_dataset imports audiocraft.metrics): bind the module imported above instead
        clap_consistency.laion_clap = sys.modules["laion_clap"]
        metric = CLAPTextConsistencyMetric.__new__(CLAPTextConsistencyMetric)  # the stubbed Metric base: no __init__
        metric.cosine_sum, metric.weight = torch.tensor(0.0), torch.tensor(0.0)
        metric._initialize_model(checkpoint, "HTSAT-base", False)
    return metric


def write_tokenizer(directory: str | Path, corpus: list[str], vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer trained on `corpus`, saved as RobertaTokenizer's vocab.json + merges.txt, with
    roberta-base's special-token ids (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4)."""
    from tokenizers import ByteLevelBPETokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(directory))
    return directory

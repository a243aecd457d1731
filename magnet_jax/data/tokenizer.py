"""T5 tokenization on the host, as the reference T5Conditioner tokenizes (docs/design.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from magnet_jax.cli import reason
from magnet_jax.fileio import WeightsError, resolve_file


class TextTokenizer:
    """T5 tokenization as the reference's T5Conditioner: EOS appended, padded to the longest description.

    `None` or "" is the null condition: tokenized as "" (just EOS) with its mask row zeroed. Descriptions longer than
    `max_length` tokens keep their first `max_length - 1` tokens and the EOS (the reference never truncates; raise
    `max_length` to match it on long texts). Word dropout (training) drops each space-separated word with
    probability `word_dropout`, before the null check, so a fully dropped description becomes null as in the
    reference. Picklable (grain workers reload the tokenizer from `source`).
    """

    def __init__(self, source: str, *, max_length: int = 256, word_dropout: float = 0.0):
        self.source, self.max_length, self.word_dropout = str(source), int(max_length), float(word_dropout)
        self._tokenizer = self._load()

    def _load(self):
        from transformers import T5Tokenizer

        resolve_file(self.source, "spiece.model", what=f"T5 tokenizer {self.source!r}")  # clear error first
        try:
            return T5Tokenizer.from_pretrained(self.source)
        except Exception as e:
            raise WeightsError(f"T5 tokenizer {self.source!r}: cannot load ({reason(e)})") from e

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer = self._load()

    @property
    def pad_id(self) -> int:
        return int(self._tokenizer.pad_token_id)

    def __call__(
        self, descriptions: Sequence[str | None], *, word_dropout_key: jax.Array | None = None
    ) -> dict[str, np.ndarray]:
        """-> `{'ids': [B, L] int32, 'mask': [B, L] int32}` NumPy, L = longest tokenized description."""
        entries = ["" if d is None else str(d) for d in descriptions]
        if word_dropout_key is not None and self.word_dropout > 0:
            entries = drop_words(entries, word_dropout_key, self.word_dropout)
        out = self._tokenizer(entries, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        ids, mask = out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)
        mask[[i for i, e in enumerate(entries) if e == ""]] = 0
        return {"ids": ids, "mask": mask}


def drop_words(entries: Sequence[str], key: jax.Array, p: float) -> list[str]:
    """Drops each space-separated word with probability p (the reference's word dropout), seeded by a JAX key."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return [" ".join(w for w in e.split(" ") if rng.random() >= p) for e in entries]

"""Evaluation prompt sets: a MusicCaps-style caption CSV as distributed, or the generation job's prompt files.

  .csv    a header row with `ytid` and `caption` columns (MusicCaps: ytid,start_s,end_s,audioset_positive_labels,
          aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval; other columns are ignored), or `id`
          and `text` columns
  .jsonl  one object per line with `text` and an optional `id` (the generation job's format; its other keys are
          ignored here), `id` defaulting to `line<NNNNN>` as the generation job names it
  .txt    one caption per line (`#` lines are comments), `line<NNNNN>`

Each caption has an `id` (a reference clip `<id>.<ext>` in the reference directory belongs to it) and a `name`
(the id the generation job gives its samples: the id itself when it is file-name safe, else `yt` + id, since
YouTube ids may start with `-`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the generation job's sample id rule


class CaptionError(ValueError):
    """The prompt set cannot be read (message is one line: file, line and problem)."""


class Caption(NamedTuple):
    id: str  # the prompt's id: the reference clip's file stem
    name: str  # the generation job's prompt id of its samples
    text: str


def _name(caption_id: str, where: str) -> str:
    name = caption_id if SAFE_NAME.fullmatch(caption_id) else f"yt{caption_id}"
    if not SAFE_NAME.fullmatch(name):
        raise CaptionError(f"{where}: id {caption_id!r} cannot name a file (expected letters, digits, . _ -)")
    return name


def read_captions(path: str | os.PathLike) -> list[Caption]:
    """The captions of a prompt set in file order; a malformed line, a missing column or a repeated id is a
    CaptionError (an evaluation set is used whole, nothing is skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CaptionError(f"prompts file {path}: cannot read it ({e})") from None
    if path.suffix == ".csv":
        rows = _csv_rows(path, text)
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path, text)
    elif path.suffix == ".txt":
        rows = [
            (n, f"line{n:05d}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    else:
        raise CaptionError(f"prompts file {path}: expected a .csv, .jsonl or .txt file")
    captions, seen = [], {}
    for line, caption_id, caption in rows:
        where = f"{path}:{line}"
        if not caption_id:
            raise CaptionError(f"{where}: empty id")
        if caption_id in seen:
            raise CaptionError(f"{where}: id {caption_id!r} repeats line {seen[caption_id]}")
        if not caption:
            raise CaptionError(f"{where}: empty caption")
        seen[caption_id] = line
        captions.append(Caption(caption_id, _name(caption_id, where), caption))
    if not captions:
        raise CaptionError(f"prompts file {path}: no captions (the file is empty)")
    return captions


def _csv_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted captions may span lines
    fields = reader.fieldnames or []
    for id_key, text_key in (("ytid", "caption"), ("id", "text")):
        if id_key in fields and text_key in fields:
            break
    else:
        raise CaptionError(f"{path}: expected a header with ytid and caption (MusicCaps) or id and text columns")
    try:
        return [(reader.line_num, (row[id_key] or "").strip(), (row[text_key] or "").strip()) for row in reader]
    except csv.Error as e:
        raise CaptionError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CaptionError(f"{path}:{number}: expected an object with a string 'text'")
        caption_id = obj.get("id", f"line{number:05d}")
        if not isinstance(caption_id, str):
            raise CaptionError(f"{path}:{number}: 'id' must be a string, got {caption_id!r}")
        rows.append((number, caption_id, obj["text"].strip()))
    return rows

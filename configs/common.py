"""Preset-string parsing shared by the config files (`configs/magnet.py:size=small,duration=10`)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `k=v,k2=v2,flag` into a ConfigDict typed after `defaults`; unknown keys are an error.

    A bare `flag` sets a boolean default to True. Values are converted to the type of their default.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown preset option {key!r} in {arg!r}; known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"preset option {key!r} needs a value ({key}=...)")
            result[key] = True
            continue
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                result[key] = value.lower() in ("true", "1")
            else:
                result[key] = type(default)(value)
        except ValueError:
            raise ValueError(f"preset option {key}={value!r}: expected {type(default).__name__}") from None
    return result

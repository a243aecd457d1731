"""What every command-line entry point shares: absl flag parsing with one-line errors, exception text for one-line
messages, and quiet logs.

A bad flag, config override or config file is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import warnings

from absl import flags, logging


def reason(e: BaseException) -> str:
    """An exception as a short reason inside a one-line message: its first non-empty line, else its type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception's whole text on one line, prefixed with its type unless it is a ValueError with a message (our
    own errors are ValueErrors whose text already says what is wrong)."""
    text = " ".join(str(e).split())
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}".rstrip(": ")


def fail(prog: str, message: str, status: int = 2) -> None:
    """Prints `prog: error: message` to stderr and exits with `status`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)


def describe_flag_error(e: BaseException, argv: list[str]) -> str:
    """One line for a failed `--config...` parse (config_flags raises several types with multi-line texts)."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(e, (KeyError, AttributeError)):  # unknown override key; the text nests quoted reprs
        key = next(iter(re.findall(r"'([A-Za-z0-9_]+)", text)), "?")
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        culprit = next((a for a in overrides if key in a.split(".")), "--config.*")
        hint = re.search(r'Did you mean "([^"]+)"', text)
        return f"{culprit}: unknown config key {key!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    if any(line.startswith("Traceback") for line in lines):  # the config file itself raised
        return f"{lines[0].rstrip(':')} {lines[-1]}"
    if isinstance(e, OSError):  # config file not found
        return f"--config: {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv: list[str], prog: str) -> list[str]:
    """absl flag parsing for `app.run(flags_parser=...)`: a bad flag or config override is one line, exit code 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS.config.to_dict()  # config_flags defers a failed config-file load to first use
    except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError) as e:
        fail(prog, describe_flag_error(e, argv))
    if len(rest) > 1:
        fail(prog, f"unexpected arguments {rest[1:]}")
    return rest


class _QuietLibraryLogs(std_logging.Filter):
    """Drops orbax's INFO chatter (per save and restore) from the log; its warnings and errors stay."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_logs() -> None:
    """Silences the libraries' routine messages in an entry point: orbax INFO lines, transformers' "PyTorch was not
    found" notice, and JAX's INFO logs."""
    logging.get_absl_handler().addFilter(_QuietLibraryLogs())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    std_logging.getLogger("jax").setLevel(std_logging.WARNING)
    warnings.filterwarnings("ignore", message=".*PyTorch was not found.*")

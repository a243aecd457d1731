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
from typing import Any

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


# ---- multi-process jobs ---------------------------------------------------------------------------------

# Flag -> environment variable read when the flag is not given (JAX itself reads JAX_COORDINATOR_ADDRESS).
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# Set in the job process that `supervise` starts (its parent prints the one-line message if it is lost).
SUPERVISED_ENV = "MAGNET_JAX_SUPERVISED"
# What JAX's runtime prints (then aborts) when the distributed service reports a dead or unreachable process.
_RUNTIME_FATAL = "JAX distributed service detected fatal errors"


def define_distributed_flags() -> None:
    """The flags of every entry point that can run as one of N cooperating JAX processes."""
    flags.DEFINE_bool("distributed", False, "run as one process of a multi-process job (jax.distributed.initialize)")
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS; unset with --num_processes and "
        "--process_id also unset: detected on TPU VMs, slurm and Open MPI)",
    )
    flags.DEFINE_integer("num_processes", None, "processes in the job (default $JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (default $JAX_PROCESS_ID)")
    flags.DEFINE_integer(
        "heartbeat_timeout",
        60,
        "seconds without a heartbeat after which a process counts as dead and the others stop (exit 1)",
    )
    flags.DEFINE_integer("init_timeout", 300, "seconds to wait for every process to join the job")


def distributed_settings(prog: str) -> dict[str, Any]:
    """The `jax.distributed.initialize` arguments of the distributed flags (or their environment variables).

    Bad values are one line on stderr and exit status 2.
    """
    values: dict[str, Any] = {}
    for name, env in DISTRIBUTED_ENV.items():
        value = flags.FLAGS[name].value
        if value is None and os.environ.get(env):
            value = os.environ[env]
            if name != "coordinator_address":
                if not value.strip().isdigit():
                    fail(prog, f"${env}={value!r}: expected a non-negative integer")
                value = int(value)
        values[name] = value
    n, i = values["num_processes"], values["process_id"]
    if n is not None and n < 1:
        fail(prog, f"--num_processes={n}: expected >= 1")
    if n is not None and i is not None and not 0 <= i < n:
        fail(prog, f"--process_id={i}: expected 0 <= process_id < num_processes={n}")
    address = values["coordinator_address"]
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        fail(prog, f"--coordinator_address={address!r}: expected host:port")
    timeout, init = flags.FLAGS.heartbeat_timeout, flags.FLAGS.init_timeout
    if timeout < 1 or init < 1:
        fail(prog, f"--heartbeat_timeout={timeout} and --init_timeout={init}: expected >= 1 second")
    return {
        **values,
        "initialization_timeout": init,
        "heartbeat_timeout_seconds": timeout,
        "shutdown_timeout_seconds": timeout,
    }


def distributed_argv() -> list[str]:
    """This command's distributed flags as arguments, for a subprocess that runs a multi-process job of its own."""
    names = ("distributed", *DISTRIBUTED_ENV, "heartbeat_timeout", "init_timeout")
    return [f"--{name}={flags.FLAGS[name].value}" for name in names if flags.FLAGS[name].value is not None]


def initialize_distributed(prog: str) -> None:
    """Joins the multi-process job the distributed flags describe (call first in `main`, before any JAX work).

    The job then runs under `supervise`, so a lost peer ends this process with one line and exit status 1. With
    more than one process the CPU backend's collectives use gloo (CPU devices of different processes cannot talk
    otherwise; TPU and GPU computations do not use the CPU backend). A failure to join is one line, exit 2.
    """
    import jax

    settings = distributed_settings(prog)
    supervise(prog, settings["process_id"])
    if settings["num_processes"] != 1 and jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except (RuntimeError, ValueError, TypeError) as e:
        fail(prog, f"cannot join the distributed job: {reason(e)}")


def _die_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGKILL when its parent dies (Linux; elsewhere a no-op)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(prog: str, process_id: int | None) -> None:
    """Runs the rest of this command in a child process and returns only inside that child.

    JAX's distributed runtime aborts a process whose peer died (or whose coordinator is gone), printing a native
    stack trace. The parent passes the child's stderr through until that point, forwards SIGTERM / SIGINT to it,
    and replaces the abort by one line (`<prog>: error: process <i>: ...`, exit 1); any other exit status is the
    child's.
    """
    import signal
    import subprocess
    import threading

    if os.environ.get(SUPERVISED_ENV):
        return
    child = subprocess.Popen(
        [sys.executable, *sys.orig_argv[1:]],
        env={**os.environ, SUPERVISED_ENV: "1"},
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    lost = threading.Event()

    def copy_stderr() -> None:
        for raw in child.stderr:
            if _RUNTIME_FATAL.encode() in raw:
                lost.set()
            if not lost.is_set():
                sys.stderr.buffer.write(raw)
                sys.stderr.buffer.flush()

    reader = threading.Thread(target=copy_stderr, daemon=True)
    reader.start()
    status = child.wait()
    reader.join(timeout=10)
    if lost.is_set():
        who = "" if process_id is None else f" {process_id}"
        fail(
            prog,
            f"process{who}: another process of the job died or the coordinator is unreachable (no heartbeat within "
            f"--heartbeat_timeout={flags.FLAGS.heartbeat_timeout} s); stopping; rerun the job to resume",
            status=1,
        )
    sys.exit(status if status >= 0 else 128 - status)

"""Files: written so that a crash never leaves a half-written one under its final name, located wherever a user
keeps them (a path, a directory, a hub id), and multi-host barriers.

Every output of the package goes through here: single files (`atomic_file`, `write_atomic`), directories
(`atomic_directory`) and the settings a job pins in its output directory (`pin_settings`). Temporary names start
with `TMP_PREFIX` and carry the host and process id, so processes sharing a file system never collide. Every input
a user names by hub id or path is found by `resolve_file`. Paths a user types are made absolute once, where they
enter (`absolute_path` for outputs and data, `local_source` for what may also be a hub id), and outputs are checked
writable before any work (`check_writable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from magnet_jax.cli import reason

TMP_PREFIX = ".tmp-"


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def absolute_path(path: str | os.PathLike) -> str:
    """A path a user gave, resolved once where it enters the program: `~` expanded, a relative path joined to the
    working directory (orbax and the config.json of a run need absolute ones). URLs (`gs://...`) and "" are kept."""
    text = os.fspath(path)
    if not text or "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def local_source(source: str | os.PathLike) -> str:
    """A model source a user gave (path or hub id): `absolute_path` when it names a local file or directory (or is
    written as a path: starting with `~`, `.` or `/`); a hub id (`facebook/magnet-small-10secs`) is kept."""
    text = os.fspath(source)
    if text.startswith(("~", ".", "/")) or (text and os.path.exists(os.path.expanduser(text))):
        return absolute_path(text)
    return text


def check_writable(path: str | os.PathLike, *, what: str, exist_ok: bool = True) -> None:
    """Raises a one-line ValueError when the directory `path` cannot be written: it is an existing file, it exists
    and `exist_ok` is False, or its nearest existing ancestor is not a writable directory. Creates nothing; remote
    paths are not checked."""
    if "://" in os.fspath(path):
        return
    path = Path(absolute_path(path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} {path}: exists and is not a directory")
        if not exist_ok:
            raise ValueError(f"{what} {path}: already exists")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not writable")


def temporary_name(path: Path) -> Path:
    """A sibling of `path` no other process uses: `.tmp-<host>-<pid>-<name>`."""
    return path.with_name(f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{path.name}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; when the block succeeds it is synced and renamed to `path`, when it fails
    it is removed. For writers that take a path (soundfile, ArrayRecord)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` (str as UTF-8) to `path` atomically. Remote paths (`gs://...`) are written in one object put,
    which object stores make atomic."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if "://" in str(path):
        epath.Path(path).write_bytes(data)
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON with a final newline, written atomically."""
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def remove_temporaries(directory: str | os.PathLike) -> None:
    """Deletes temporaries left in `directory` by interrupted writes (call while no other writer runs)."""
    for stale in Path(directory).glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of `directory` to fill; renames it to `directory` when the block succeeds.

    Multi-host: every process enters (the temporary name is the same on all); only process 0 touches the file
    system outside the block.
    Raises:
      FileExistsError: `directory` exists and `overwrite` is off.
    """
    final = Path(directory).expanduser().absolute()
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    primary = jax.process_index() == 0
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed write
        tmp.mkdir(parents=True)
    barrier("atomic_directory:start")
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if primary:
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    barrier("atomic_directory:done")


# ---- checksum manifests ---------------------------------------------------------------------------------

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 22


class IntegrityError(ValueError):
    """Files do not match the checksum manifest written when they were complete (message is one line, naming the
    file)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks; local or remote through etils.epath)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        name = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _files_under(child, f"{name}/")
        elif name != CHECKSUMS_FILE:
            yield name, child


def directory_checksums(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size": bytes, "sha256": hex}}` of every file under `directory` (the manifest itself
    excluded)."""
    return {
        name: {"size": _size(path), "sha256": file_sha256(path)} for name, path in _files_under(epath.Path(directory))
    }


def manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One SHA-256 over a manifest's (path, size, sha256) entries: the checksum of a whole directory."""
    text = "".join(f"{name}\0{entry['size']}\0{entry['sha256']}\n" for name, entry in sorted(files.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_checksums(directory: str | os.PathLike) -> str:
    """Writes `<directory>/checksums.json` for the files now in `directory` (call once they are complete); returns
    the directory digest (`manifest_digest`)."""
    files = directory_checksums(directory)
    digest = manifest_digest(files)
    write_json(epath.Path(directory) / CHECKSUMS_FILE, {"format": 1, "digest": digest, "files": files})
    return digest


def verify_checksums(directory: str | os.PathLike) -> str:
    """Checks every file of `directory` against its `checksums.json`; returns the directory digest.

    Raises:
      IntegrityError: the manifest is missing or unreadable, a listed file is missing, has another size or
        checksum, or a file is not listed. The message names the first such file.
    """
    root = epath.Path(directory)
    manifest_path = root / CHECKSUMS_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        digest = manifest["digest"]
    except FileNotFoundError:
        raise IntegrityError(f"{manifest_path}: missing (the write did not complete)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{manifest_path}: unreadable checksum manifest ({reason(e)})") from None
    present = dict(_files_under(root)) if root.is_dir() else {}
    for name, entry in sorted(files.items()):
        path = present.pop(name, None)
        if path is None:
            raise IntegrityError(f"{root / name}: missing (listed in {CHECKSUMS_FILE})")
        size = _size(path)
        if size != entry["size"]:
            raise IntegrityError(f"{root / name}: {size} bytes, {CHECKSUMS_FILE} lists {entry['size']}")
        if file_sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{root / name}: SHA-256 differs from {CHECKSUMS_FILE} (damaged)")
    if present:
        raise IntegrityError(f"{root / sorted(present)[0]}: not listed in {CHECKSUMS_FILE}")
    if manifest_digest(files) != digest:
        raise IntegrityError(f"{manifest_path}: its digest does not match its file list (damaged)")
    return digest


def read_digest(directory: str | os.PathLike) -> str | None:
    """The digest recorded in `<directory>/checksums.json` without verifying the files (None when absent)."""
    try:
        return json.loads((epath.Path(directory) / CHECKSUMS_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _size(path: epath.Path) -> int:
    return int(path.stat().length)


# ---- job locks ------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class LockError(ValueError):
    """Another job holds the directory (message is one line: who, since when, what to do)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def directory_lock(
    directory: str | os.PathLike, *, force: bool = False, flag: str = "--force_unlock", name: str = LOCK_FILE
) -> Iterator[None]:
    """Holds `<directory>/<name>` (default `.lock`; JSON: host, pid, start time) while the block runs: one job per
    directory (per lock name).

    The lock is advisory: it is created with O_EXCL, so two jobs starting together cannot both take it. A lock left
    by a process of this host that no longer runs (a kill -9) is taken over with a warning; a lock of another host
    is respected (its process cannot be checked from here) unless `force` (the command's `flag`). Local paths only
    (a `gs://` directory is not locked).

    Raises:
      LockError: a live process of this host, or another host, holds the directory.
    """
    if "://" in str(directory):
        yield
        return
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
                host, pid = str(held["host"]), int(held["pid"])
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                held, host, pid = {}, "?", -1  # torn by a crash while it was written: stale
            stale = host == mine["host"] and not _alive(pid) or host == "?"
            if not (stale or force):
                where = "this host" if host == mine["host"] else f"host {host}"
                hint = "wait for it or stop it" if host == mine["host"] else f"pass {flag} if that job is gone"
                raise LockError(
                    f"{directory} is in use by another job (pid {pid} on {where}, since {held.get('since', '?')}; "
                    f"lock file {path}); {hint}"
                ) from None
            logging.warning(
                "lock: taking over %s from pid %s on host %s (%s)",
                path,
                pid,
                host,
                "forced" if not stale else "that process is gone",
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == mine["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def flatten_dict(tree: Mapping, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """A nested dict (a param tree, a settings file) as `{'a/b/c': leaf}`."""
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten_dict(v, name, sep))
        else:
            flat[name] = v
    return flat


def unflatten_dict(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """Inverse of `flatten_dict`."""
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def pin_settings(path: str | os.PathLike, settings: Mapping[str, Any], *, error: type[Exception] = ValueError) -> None:
    """Writes the JSON `settings` a job's output depends on to `path`, or checks that an existing file holds the same.

    Raises:
      error: the file holds other settings (naming every field that differs) or cannot be read.
    """
    path = Path(path)
    current = flatten_dict(json.loads(json.dumps(dict(settings))), sep=".")
    if not path.exists():
        write_json(path, dict(settings))
        return
    try:
        stored = flatten_dict(json.loads(path.read_text(encoding="utf-8")), sep=".")
    except (OSError, ValueError) as e:
        raise error(
            f"{path}: cannot read the pinned job settings ({reason(e)}); remove it or use another output directory"
        ) from None
    diffs = [
        f"{k}: {stored.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(stored) | set(current))
        if stored.get(k) != current.get(k)
    ]
    if diffs:
        raise error(
            f"{path.parent} holds the output of a job with other settings ({'; '.join(diffs)}); rerun with "
            "the same settings to resume, or use another output directory"
        )


class WeightsError(ValueError):
    """Weights could not be found, read, or matched to the model (message is one line)."""


def resolve_file(source: str | os.PathLike, filename: str, *, what: str) -> Path:
    """Finds `filename` for `source`: a local file, a local directory holding it, or a Hugging Face hub id.

    Args:
      source: path to the file itself, a directory containing `filename`, or a hub id (`facebook/magnet-small-10secs`).
      filename: the file name inside a directory or hub repository (e.g. `state_dict.bin`).
      what: words for error messages (e.g. "MAGNeT LM weights").
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        raise WeightsError(f"{what}: directory {path} has no {filename}")
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise WeightsError(f"{what}: {source} is neither a file nor a directory holding {filename}")
    return _download(str(source), filename, what=what)


def local_file(path: str | os.PathLike, *, what: str) -> Path:
    """`path` itself, if it is an existing file (weights a user brings; no hub look-up)."""
    if not Path(path).expanduser().is_file():
        raise WeightsError(f"{what}: {path} is not a file")
    return Path(path).expanduser()


_HUB_PROBES: dict[str, str | None] = {}  # hub endpoint -> why it cannot be reached (None: it can)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None: "HF_HUB_OFFLINE is set", or a failed TCP connect (3 s
    timeout, once per process) to the endpoint, so an offline machine fails in seconds instead of retrying for
    minutes. With a proxy configured the connect is left to huggingface_hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_PROBES:
        url = urllib.parse.urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=3).close()
            _HUB_PROBES[endpoint] = None
        except OSError as e:
            _HUB_PROBES[endpoint] = f"{url.hostname}:{port} is unreachable ({reason(e)})"
    return _HUB_PROBES[endpoint]


def _download(repo_id: str, filename: str, *, what: str) -> Path:
    """`filename` of hub repository `repo_id`, from the local cache only when the hub cannot be reached."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise WeightsError(f"{what}: huggingface_hub is needed to download {repo_id}: {e}") from e
    offline = hub_unreachable()
    hint = (
        f"the hub cannot be used: {offline}" if offline else "offline or unreachable"
    ) + f"; pass a local directory holding {filename} instead"
    if offline != "HF_HUB_OFFLINE is set":
        hint += " (with HF_HUB_OFFLINE=1 nothing is looked up on the network)"
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline is not None))
    except LocalEntryNotFoundError as e:  # offline or unreachable, and not in the local cache
        raise WeightsError(f"{what}: {filename} of hub id {repo_id!r} is not in the local cache ({hint})") from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise WeightsError(f"{what}: hub repository {repo_id} has no {filename} ({type(e).__name__})") from e
    except Exception as e:  # no network, proxy errors: all one message
        raise WeightsError(f"{what}: could not fetch {filename} from hub id {repo_id!r} ({reason(e)}; {hint})") from e

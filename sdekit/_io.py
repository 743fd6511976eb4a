"""Atomic file writes (temporary file in the same folder, fsync, ``os.replace``): a reader never
sees a half-written checkpoint, shard, cache cell or report, and an interrupted write leaves the
previous file intact. Temporary files left by a killed writer are removed by the next write to
the same target.

Content hashes: :func:`content_hash` is a SHA-256 over nested dicts/lists of tensors and plain
values (each tensor's dtype, shape and bytes, keys in sorted order), independent of how
``torch.save`` lays the archive out. :func:`save_verified` stores it beside the payload and
:func:`load_verified` checks it, because torch's zip reader does not verify CRCs: flipped bytes
inside a tensor record would otherwise load silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

#: A temporary file older than this is stale even if its writer's pid looks alive (pid reuse,
#: a writer on another host of a shared file system).
STALE_TMP_AGE_S = 24 * 3600.0
HASH_KEY = "sha256"


class IntegrityError(ValueError):
    """A file that cannot be read back or whose content hash does not match."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(path: str | os.PathLike, max_age: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove the temporary files of earlier writes to ``path`` whose writer is gone: written on
    this host by a pid that no longer exists, or older than ``max_age`` seconds. Files of live
    writers (this process included) are kept, so concurrent writers are safe. Returns the
    removed paths."""
    path = Path(path)
    pat = re.compile(re.escape(f".{path.name}.") + r"(?:([0-9a-f]{8})-(\d+)\.)?[a-z0-9_]{8}\.tmp")
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    now, host = time.time(), _host()
    for name in names:
        m = pat.fullmatch(name)
        if not m:
            continue
        f = path.parent / name
        try:
            old = now - f.stat().st_mtime > max_age
        except OSError:
            continue
        pid = int(m.group(2)) if m.group(2) else None
        dead = pid is not None and m.group(1) == host and pid != os.getpid() \
            and not _pid_alive(pid)
        if old or dead:
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it into place.

    The temporary file is ``.<name>.<host>-<pid>.<random>.tmp``; stale ones of earlier writes
    to the same target are removed first (:func:`clean_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; use the usual file mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------ content hashes
def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        h.update(f"D{len(items)}:".encode())
        for k, v in items:
            h.update(f"{k!r}=".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"V{obj!r};".encode())
    else:
        raise TypeError(f"content_hash: cannot hash a {type(obj).__name__}")


def content_hash(obj: Any) -> str:
    """SHA-256 (hex) of nested dicts/lists/tuples of tensors (dtype, shape and bytes) and plain
    values, keys in sorted order: equal for equal content whatever the file layout."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_verified(path: str | os.PathLike, obj: Mapping[str, Any]) -> str:
    """``torch.save`` a dict atomically with its :func:`content_hash` under ``"sha256"``;
    returns the hash."""
    body = {k: v for k, v in obj.items() if k != HASH_KEY}
    digest = content_hash(body)
    atomic_torch_save(path, {**body, HASH_KEY: digest})
    return digest


def read_torch(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(weights_only=True)`` with an :class:`IntegrityError` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, UnpicklingError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IntegrityError(f"cannot read {what} {str(path)!r}: the file is corrupt, truncated "
                             f"or not a torch file ({type(e).__name__}: {msg[:200]})") from None


def verify(path: str | os.PathLike, obj: Any, what: str = "file",
           legacy_ok: bool = True) -> Any:
    """Check the content hash stored in the dict ``obj`` read from ``path``; returns ``obj``
    without it. A file without a hash (written by an older sdekit) loads with a warning when
    ``legacy_ok``, else raises."""
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} {str(path)!r} does not hold a dict")
    body = {k: v for k, v in obj.items() if k != HASH_KEY}
    stored = obj.get(HASH_KEY)
    if stored is None:
        if not legacy_ok:
            raise IntegrityError(f"{what} {str(path)!r} has no content hash")
        warnings.warn(f"{what} {str(path)!r} has no content hash (written by an older sdekit): "
                      "its integrity cannot be checked; save it again to add one", stacklevel=3)
        return body
    try:
        actual = content_hash(body)
    except TypeError as e:
        raise IntegrityError(f"{what} {str(path)!r}: {e}") from None
    if actual != stored:
        raise IntegrityError(f"{what} {str(path)!r} is corrupt: its content hash is "
                             f"{actual[:16]}..., the one recorded at save time {str(stored)[:16]}"
                             "...; restore it from a backup or recreate it")
    return body


def load_verified(path: str | os.PathLike, what: str = "file", legacy_ok: bool = True) -> Any:
    """Read a file written by :func:`save_verified` and check its hash."""
    return verify(path, read_torch(path, what), what, legacy_ok)


# ------------------------------------------------------------------ exclusive locks
class LockedError(RuntimeError):
    """The lock is held by another process."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the ``with`` block,
    or raise :class:`LockedError` at once naming the holder (pid and host, written into the
    file while it is held). The kernel releases the lock when the holder exits, however it
    exits; there is no stale lock to clean. Without ``fcntl`` (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise LockedError(f"{str(path)!r} is held by {holder or 'another process'}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # unlocked: no holder to name
    finally:
        os.close(fd)

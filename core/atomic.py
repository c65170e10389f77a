"""The one way this project publishes a file or a folder: nothing half-written is ever visible.

Everything is first written under a hidden temporary name in the destination's own folder
(same file system, so the final `os.replace` is atomic), flushed to disk with `fsync`, renamed
into place, and the parent folder is `fsync`ed so the rename itself survives a power loss.
Used for checkpoints, training artefacts, Triton model directories and memory banks.

A writer killed mid-way (kill -9, power loss) leaves its hidden staging folder behind; the next
`staged_directory` for the same destination removes every such folder no live writer holds.
"""

from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def make_parent(path: Path) -> None:
    """Create the folder of an output file a user named (`--out`); a new folder outside the cwd is announced.

    `--out /somewhere/else/x.png` may create a whole tree; saying so on stderr keeps a typo in a
    path from silently scattering results across the file system.
    """
    parent = Path(path).parent
    if parent.is_dir():
        return
    if not parent.resolve().is_relative_to(Path.cwd().resolve()):
        print(f"note: creating folder {str(parent.resolve())!r} (outside the working directory)", file=sys.stderr)
    parent.mkdir(parents=True, exist_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root` (children first), then `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name next to `path` (same folder, so a rename onto `path` is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: Path, writer: Callable[[Path], object]) -> Path:
    """Call `writer(tmp)` to produce the file, then fsync and rename it to `path`.

    `writer` gets a temporary path in the same folder (np.save, safetensors, torch.save and
    `Path.write_bytes` all fit); on any error the temporary file is removed and `path` keeps
    its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        writer(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


STALE_AFTER_S = 2.0
"""A staging folder is only judged stale once this old: its writer locks it just after creating it."""


@contextmanager
def staged_directory(
    target: Path, *, replace: bool, before_publish: Callable[[], object] | None = None
) -> Iterator[Path]:
    """Yield an empty hidden staging folder; on success it becomes `target` atomically.

    An existing `target` is only replaced with `replace=True` (see `publish_directory`), so
    readers see either the old or the new folder, never a mix. `before_publish` runs after the
    staged files are durable and just before the swap, to re-check a destination that may have
    changed meanwhile. On any error the staging folder is removed and `target` is left as it was.
    The folder is `flock`ed while it is written, so `remove_stale_staging` can tell it from the
    leftovers of dead writers, which it deletes first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until we are done; the kernel drops it when this process dies
    try:
        yield staging
        fsync_tree(staging)
        if before_publish is not None:
            before_publish()
        publish_directory(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def remove_stale_staging(target: Path, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the `.NAME.staging-*` folders beside `target` whose writer is gone; returns them.

    A live writer holds an `flock` on its staging folder; a folder whose lock can be taken
    belongs to a writer that died (kill -9 during a bank build) and is removed.
    """
    removed = []
    for folder in Path(target).parent.glob(f".{glob.escape(Path(target).name)}.staging-*"):
        try:
            if time.time() - folder.lstat().st_mtime < min_age_s:
                continue  # a writer between mkdtemp and flock looks unlocked for an instant
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except BlockingIOError:
            pass  # a live writer
        finally:
            os.close(fd)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc older than glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: no exchange on this file system
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def publish_directory(staging: Path, target: Path, *, replace: bool) -> None:
    """Rename `staging` to `target`; an old `target` is replaced only with `replace`.

    The old folder is swapped out with one `renameat2(RENAME_EXCHANGE)` where Linux offers it, so
    the path always holds a whole folder; elsewhere it is renamed aside first (a moment with no
    folder, one rename long). Either way the old folder is deleted after the new one is in place.
    """
    if not target.exists():
        os.replace(staging, target)
        fsync_path(target.parent)
        return
    if not replace:
        raise FileExistsError(f"{target} already exists")
    if exchange_paths(staging, target):
        fsync_path(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        return
    retired = temporary_sibling(target, "old")
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(retired, target)
        raise
    fsync_path(target.parent)
    shutil.rmtree(retired, ignore_errors=True)

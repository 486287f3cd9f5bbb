"""Directories that appear only when complete, and the numbers a conversion reports."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


@dataclasses.dataclass
class ConversionStats:
    """What a conversion moved: tensors written, their bytes, and the wall-clock seconds it took."""

    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        return (f"{self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s ({rate:.0f} MB/s), "
                f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. Linux: VmHWM, because ru_maxrss also counts the
    parent's RSS when a process was started by fork + exec (the kernel carries it across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


def check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, inner: str | None = None) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `path`; when the body completes it (or its subdirectory
    `inner`, for writers that want to create their directory themselves) is synced (every file and
    directory) and renamed to `path`; otherwise it is deleted. A failed write therefore never leaves a
    directory that looks complete, and a renamed one survives a power cut.

    The temporary directory is `.{name}.tmp-*` in the same parent, so the final rename stays on one
    filesystem (atomic). An existing non-empty `path` is refused unless `overwrite`, and then replaced only
    after the new directory is complete.
    """
    path = Path(path).absolute()  # Orbax refuses relative paths
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        done = tmp / inner if inner else tmp
        sync_tree(done)
        old = None
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(done, path)  # rename(2) may replace an empty directory
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if inner:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Syncs every file, then every directory: a rename is durable only once what it points at is. Writers
    therefore need not sync as they go (see `EarlySync`); the files are synced in parallel, so the disk sees
    many requests at once."""
    files, directories = [], []
    for directory, _, names in os.walk(root):
        directories.append(Path(directory))
        files += [Path(directory) / name for name in names]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(_fsync, files))
    for directory in reversed(directories):  # deepest first
        _fsync(directory)


class EarlySync:
    """Syncs finished files or directory trees in a background thread while a conversion goes on, so that
    the disk writes them back meanwhile and little is left for the sync before the final rename (a
    conversion otherwise leaves gigabytes dirty, as the kernel starts writing back only past ~10% of RAM)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early-sync")
        self._pending: list = []

    def submit(self, path: Path) -> None:
        self._pending.append(self._pool.submit(sync_tree if path.is_dir() else _fsync, path))

    def wait(self, *, check: bool = True) -> None:
        """Waits for every sync submitted (raising the first error if `check`) and stops the thread."""
        try:
            for future in self._pending:
                if check:
                    future.result()
                else:
                    future.exception()
        finally:
            self._pending.clear()
            self._pool.shutdown()


def write_json(path: Path, obj) -> None:
    """Writes indented JSON and syncs it (the directory is renamed into place only after)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def release_freed_memory() -> None:
    """Hands memory freed by native code back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Tensorstore (under Orbax) frees its per-array IO buffers into glibc's per-thread arenas, which keep
    them: without this, a streamed conversion's RSS creeps up by about a hundred MB per large parameter.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

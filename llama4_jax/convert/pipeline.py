"""Overlapping a conversion's reads with its writes, in bounded and reused memory.

A conversion reads a tensor (HF safetensors, or one block of an Orbax array), then writes it; doing both in
one thread leaves the disk idle during the reads and the CPU idle during the writes. `prefetch` reads the
next tensor in a background thread (file reads and tensorstore release the GIL) while the caller writes
the current one, into two reusable buffers: a fresh 256 MiB array costs 65k page faults (and, on a host
short of free memory, huge-page compaction), which took longer than reading the data into it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class Slot:
    """A reusable host buffer that hands out arrays front to back until `reset` frees them all."""

    def __init__(self, nbytes: int):
        self._buffer = np.empty(nbytes, np.uint8)  # pages are touched (and counted in RSS) only when used
        self._used = 0

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array in the buffer, or a fresh one if the buffer is full."""
        dtype = np.dtype(dtype)
        start = -(-self._used // 64) * 64  # cache-line aligned
        stop = start + math.prod(shape) * dtype.itemsize
        if stop > self._buffer.size:
            return np.empty(shape, dtype)
        self._used = stop
        return self._buffer[start:stop].view(dtype).reshape(shape)

    def reset(self) -> None:
        self._used = 0


def prefetch(items: Iterable[T], load: Callable[[T, Slot], R], *, slot_bytes: int) -> Iterator[tuple[T, R]]:
    """Yields `(item, load(item, slot))` in order, loading the next item in a background thread meanwhile.

    There are two slots of `slot_bytes` (size them to the largest item): the caller's item lives in one
    while the next is loaded into the other, so at most two items are in memory (plus any `load` allocates
    outside its slot). The caller finishes an item by asking for the next one, after which the item's
    memory is reused: it must not keep references to it. An exception in `load` is raised here.
    """
    free: queue.Queue = queue.Queue()
    for _ in range(2):
        free.put(Slot(slot_bytes))
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                slot = free.get()
                if stop.is_set():
                    return
                slot.reset()
                results.put((item, slot, load(item, slot)))
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, which raises it
            results.put(error)
            return
        results.put(_DONE)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (got := results.get()) is not _DONE:
            if isinstance(got, BaseException):
                raise got
            item, slot, value = got
            del got
            yield item, value
            del value
            free.put(slot)
    finally:
        stop.set()
        free.put(None)  # wakes the producer if it waits for a slot
        thread.join()  # an abandoned loop waits for the load in progress, then the thread exits

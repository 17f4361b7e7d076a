"""Channel threads: QEMU's multifd channels for a mapped-ram file, in Python.

Each channel is a thread with its own file descriptor on the snapshot file, taking
work from one shared queue, as multifd_send()/multifd_recv() hand work to whichever
channel is free. The GIL is released inside os.pwritev/os.preadv, so the channels
overlap their I/O. ``sync()`` is multifd_*_sync_main with MULTIFD_SYNC_LOCAL: wait
until every queued item is done; nothing goes into the stream.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Generic, TypeVar

Item = TypeVar("Item")
_STOP = object()
MAX_CHANNELS = 255  # QEMU's multifd-channels range is 1..255


def check_count(count: int) -> int:
    """``count`` if it is a channel count QEMU would accept (1..MAX_CHANNELS), else ValueError."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CHANNELS:
        raise ValueError(f"channels: a number from 1 to {MAX_CHANNELS}, not {count!r}")
    return count


class Channels(Generic[Item]):
    """``count`` worker threads running ``work(fd, item)`` for every submitted item."""

    def __init__(
        self,
        path: str,
        count: int,
        flags: int,
        work: Callable[[int, Item], None],
        name: str = "channel",
        depth: int | None = None,
    ) -> None:
        check_count(count)
        self.syncs = 0
        self._work = work
        # depth: items that may wait; enough that the producer can prepare the next batch
        # of work while the channels drain this one, so neither side idles.
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth or 4 * count)
        self._error: BaseException | None = None
        self._closing = False
        self._stops = 0
        self._fds: list[int] = []
        self._threads: list[threading.Thread] = []  # started ones only
        try:
            for i in range(count):
                fd = os.open(path, flags | os.O_CLOEXEC)
                self._fds.append(fd)
                thread = threading.Thread(target=self._run, args=(fd,), name=f"{name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.close()
            raise

    def _run(self, fd: int) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None and not self._closing:  # after a failure, drain without working
                    self._work(fd, item)  # type: ignore[arg-type]
            except BaseException as err:  # handed to the thread that syncs
                self._error = self._error or err
            finally:
                item = None  # an idle channel must not keep its last item's buffers alive
                self._queue.task_done()

    def submit(self, item: Item) -> None:
        if self._error is not None:
            self._raise()
        self._queue.put(item)

    def sync(self) -> None:
        """Wait until every submitted item is done; re-raise a channel's error here."""
        self._queue.join()
        self.syncs += 1
        if self._error is not None:
            self._raise()

    def _raise(self) -> None:
        err, self._error = self._error, None
        assert err is not None
        raise err

    def close(self) -> None:
        """Stop every thread (work still queued is dropped) and close every descriptor."""
        self._closing = True
        # One stop item per started thread: each takes exactly one and returns. Counted,
        # so that a close() interrupted (Ctrl-C) and called again sends no extra ones.
        while self._stops < len(self._threads):
            self._queue.put(_STOP)
            self._stops += 1
        for thread in self._threads:
            thread.join()
        # only now: a descriptor closed under a running thread could be reused by another file
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwritev until every byte is written (a short write is not an error)."""
    done = 0
    while done < len(data):
        done += os.pwritev(fd, [data[done:]], offset + done)

"""Host preprocessing and host->device transfer, run ahead of the training step on a background thread."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator


class Prefetcher:
    """Runs ``produce`` ``depth`` items ahead on a background thread; an exception there surfaces in :meth:`next`."""

    def __init__(self, produce: Iterator[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def work():
            try:
                for item in produce:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as e:  # surfaced in the main thread by next()
                self._queue.put(e)

        self._thread = threading.Thread(target=work, daemon=True, name="ctr-prefetch")
        self._thread.start()

    def next(self) -> Any:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

"""Prepare the next inputs in a thread of this process while the forward pass runs.

On CPU the default loader is one background thread: it costs nothing to start (a loader
process took 0.8-1.3 s per ``encode`` call on 2 cores), and reading, conforming and checking
a volume overlap with the forward pass of the one before, which releases the GIL (OpenVINO's
``infer``, torch's operators), as do gzip inflation, NumPy and SciPy for most of the work.
Inputs come back in order, at most ``depth`` ahead of the consumer, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ThreadPrefetcher", "blas_single_thread"]

_END = object()
_CONTROLLER: list[Any] = []


class ThreadPrefetcher:
    """Iterate ``produce(0)``, ``produce(1)``, ... ``produce(n - 1)`` computed in a background thread.

    ``produce`` must not raise (the encoder's dataset turns every error into a failure record);
    if it does anyway, the exception is re-raised in the consuming thread. Closing the
    iterator (or leaving a ``for`` loop early) stops the thread after the item in progress.

    Example:
        >>> with ThreadPrefetcher(lambda i: i * i, 4) as it:
        ...     list(it)
        [0, 1, 4, 9]
    """

    def __init__(self, produce: Callable[[int], Any], n: int, depth: int = 2) -> None:
        self._produce, self._n = produce, n
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anatcl-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for i in range(self._n):
                if self._stop.is_set() or not self._put((True, self._produce(i))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((False, exc))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            ok, value = item
            if not ok:
                raise value
            yield value

    def close(self) -> None:
        """Stop the thread (after the item it is preparing) and drop what it prepared."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=30)

    def __enter__(self) -> ThreadPrefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """BLAS (NumPy's matrix products, used to resample) on one thread while a loader runs beside the forward.

    Oversubscribed BLAS threads made `anatcl embed` on 1 mm inputs cost 2.8x the forward instead of
    1.2x on 2 cores (benchmarks/NOTES.md, attempt 3). The limit is process-wide while it lasts.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    if not _CONTROLLER:  # finding the loaded BLAS libraries costs 2-100 ms: once per process
        _CONTROLLER.append(ThreadpoolController())
    with _CONTROLLER[0].limit(limits=1, user_api="blas"):
        yield

"""Control of a running driver from another thread (chaos timelines): the `Mailbox`.

The driver's watch loop owns the member processes, so nothing else touches them: another thread
posts a function with `call`, the loop runs it between two passes (`serve`) and the caller gets
its result or its exception. Requests are accepted only while the loop runs (`open`); one that
arrives before or after, or is still queued when the loop ends, fails with LookupError rather
than waiting for a loop that will never serve it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any


class Mailbox:
    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._lock = threading.Lock()
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run `fn` in the loop's thread and return its result (raises what `fn` raised)."""
        future: Future[Any] = Future()
        with self._lock:
            if not self._open:
                raise LookupError("the run is not training now (not started, or finished)")
            self._requests.put((fn, future))
        return future.result(timeout=timeout_s)

    def post(self, fn: Callable[[], Any]) -> Future[Any]:
        """Queue `fn` without the open check (what a request racing the loop's end looks like)."""
        future: Future[Any] = Future()
        self._requests.put((fn, future))
        return future

    def serve(self) -> None:
        """Run every queued request; called by the loop's thread between passes."""
        while True:
            try:
                fn, future = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, not fatal to the run
                future.set_exception(e)

    @contextlib.contextmanager
    def open(self) -> Iterator[Mailbox]:
        """Accept requests for the duration of the block; fail what is left when it ends."""
        with self._lock:
            self._open = True
        try:
            yield self
        finally:
            with self._lock:
                self._open = False
            while True:
                try:
                    _, future = self._requests.get_nowait()
                except queue.Empty:
                    break
                future.set_exception(LookupError("the run finished before the request was served"))

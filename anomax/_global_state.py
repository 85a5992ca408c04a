"""Process-wide settings of other libraries that anomax changes while it works, then puts back."""
from __future__ import annotations

import logging
import threading
from typing import Callable


class WhileInside:
    """``change()`` applies a process-wide setting and returns how to undo it; applied when the first
    user enters, undone when the last leaves, so work in several threads shares one change."""

    def __init__(self, change: Callable[[], Callable[[], None]]):
        self._change, self._lock, self._users, self._undo = change, threading.Lock(), 0, None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._undo = self._change()
            self._users += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._undo()
                self._undo = None


def _keep_root_logger():
    """Libraries that log through the root logger (absl, under TFDS and grain; jax2onnx) call
    logging.basicConfig() when it has no handler, which leaves a stderr handler there: an
    application's own basicConfig afterwards would change nothing (anomax's INFO lines never showed).
    A NullHandler stands in meanwhile."""
    root = logging.getLogger()
    if root.handlers:
        return lambda: None
    guard = logging.NullHandler()
    root.addHandler(guard)
    return lambda: root.removeHandler(guard)


root_logger_kept = WhileInside(_keep_root_logger)

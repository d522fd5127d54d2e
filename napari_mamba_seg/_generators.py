"""Long jobs in the core are generators that yield progress and return their result (DESIGN.md); this runs one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import TypeVar

__all__ = ["CancelSignal", "cancel_predicate", "run_to_end"]

CancelSignal = threading.Event | Callable[[], bool] | None
"""What ``cancel`` may be: None, a ``threading.Event`` (cancel when set), or a callable returning True to cancel."""

Update = TypeVar("Update")
Result = TypeVar("Result")


def run_to_end(steps: Generator[Update, None, Result], progress: Callable[[Update], None] | None = None) -> Result:
    """Run ``steps`` to its end, calling ``progress`` with every yielded update; return the generator's result."""
    while True:
        try:
            update = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(update)


def cancel_predicate(cancel: CancelSignal) -> Callable[[], bool]:
    """A no-argument function telling whether ``cancel`` (None, an Event or a callable) asks to stop."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be None, a threading.Event or a callable returning bool, got {type(cancel).__name__}")

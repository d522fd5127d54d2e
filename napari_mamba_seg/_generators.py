"""Long jobs in the core are generators that yield progress and return their result (DESIGN.md); this runs one."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

__all__ = ["run_to_end"]

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

"""Run a core generator job in a napari worker thread, with every failure delivered to one callback.

superqt drops a ``RuntimeError`` raised in a worker (``PredictionCancelled``, CUDA out of memory) without emitting
``errored`` or ``finished``, which would leave a widget stuck in its running state; so the job's exceptions are
caught in the thread and handed back as values.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import create_worker

__all__ = ["JobFailure", "start_job"]


@dataclass
class JobFailure:
    """An exception raised by a job, returned rather than raised."""

    error: BaseException


def start_job(
    job: Generator[Any, None, Any],
    *,
    on_progress: Callable[[Any], None],
    on_result: Callable[[Any], None],
    on_failure: Callable[[BaseException], None],
    on_finished: Callable[[], None],
) -> Any:
    """Start ``job`` (a generator yielding progress and returning a result) in a worker thread.

    Args:
        job: The generator; it runs in the worker thread.
        on_progress: Called in the UI thread with every yielded value.
        on_result: Called in the UI thread with the returned value.
        on_failure: Called in the UI thread with the exception when the job raised.
        on_finished: Called in the UI thread last, whatever happened.

    Returns:
        The started napari ``GeneratorWorker``.
    """

    def run() -> Generator[Any, None, Any]:
        try:
            return (yield from job)
        except Exception as error:  # every failure reaches the user through on_failure
            return JobFailure(error)

    def deliver(outcome: Any) -> None:
        if isinstance(outcome, JobFailure):
            on_failure(outcome.error)
        else:
            on_result(outcome)

    worker = create_worker(run, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(on_progress)
    worker.returned.connect(deliver)
    worker.errored.connect(on_failure)
    worker.finished.connect(on_finished)
    worker.start()
    return worker

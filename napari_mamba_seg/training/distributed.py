"""Data-parallel training on several processes (PyTorch DistributedDataParallel), launched with torchrun.

Usage (one machine, 4 GPUs; the global batch of 16 is split 4 ways, so each GPU draws 4 patches per step)::

    torchrun --standalone --nproc_per_node 4 -m napari_mamba_seg.cli train Dataset001_Breast -o runs/v1 \\
        --arch vm_unet --batch-size 16
    # the same on the CPU (gloo), e.g. to test a set-up; OMP_NUM_THREADS splits the cores between the processes
    OMP_NUM_THREADS=2 torchrun --standalone --nproc_per_node 2 -m napari_mamba_seg.cli train ... --device cpu

``torchrun --no-python napari-mamba-seg train ...`` works too. Without torchrun (``WORLD_SIZE`` unset or 1) the same
code runs as one process. Several machines: ``torchrun --nnodes N --node_rank K --rdzv_endpoint HOST:PORT ...``.

What each process does (one *rank* of ``WORLD_SIZE``; ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` come from torchrun):

* device and backend: ``cuda:LOCAL_RANK`` with NCCL when the device asked for is CUDA (``auto`` on a CUDA machine),
  else the CPU with gloo. A second, gloo, group carries the small CPU-side messages (cancel flags, validation
  results), so they never wait for the GPU stream.
* data: global step ``s`` uses the samples ``s * B ... s * B + B - 1`` of the global batch ``B``
  (:class:`~napari_mamba_seg.training.dataset.SegmentationDataset` indices, deterministic in ``(seed, index)``);
  rank ``r`` draws only its share ``s * B + r * B / W ...`` (:func:`rank_slice`), so ``B`` must be divisible by
  ``W``. Every rank streams its cases from disk on its own (``TrainingConfig.cache_size`` prepared cases each).
* loss: the loss of the *global* batch on every rank. The Dice and cross-entropy sums (numerators, denominators,
  trusted-voxel counts; per-sample Dice values) are summed over the ranks (:func:`global_sum`) before they are
  combined; that sum passes ``W`` times the incoming gradient back to the local sum, and DDP averages the gradients
  over the ranks, so the averaged gradient is the gradient of the global batch's loss (for the per-sample Dice the
  plain average would do, for nnU-Net's batch Dice and the trusted-voxel mean of the cross-entropy it would not).
  The update equals the single-process update on the same global batch up to float32 summation order.
* BatchNorm: on CUDA every ``BatchNorm`` is made a ``SyncBatchNorm`` (statistics of the global batch). On the CPU
  torch has no SyncBatchNorm: BatchNorm layers then normalise with the statistics of the rank's share only (a
  warning says so); sa_umamba, mlla_unet, attention_mamba and unet with ``norm="batch"`` have BatchNorm; the
  other registered architectures use Instance-, Group- or LayerNorm, which are per sample.
* validation: the validation cases are split between the ranks (case ``i`` on rank ``i % W``), the per-case
  metrics gathered in case order, and every rank computes the same summary, so every rank takes the same
  early-stopping decision.
* output: only rank 0 writes checkpoints (``last/``, ``best/``; the optimizer state of any rank is the full state,
  since every rank holds every parameter and the same gradients) and prints progress.
* cancel: Ctrl-C goes to torchrun, which passes SIGINT on to every rank; a cancel on any rank stops every rank after
  the same step (:func:`agreed_predicate`).
* resume: a checkpoint holds the global step and the full state, so a run written with ``W`` processes continues
  with any ``W'`` whose global batch divides (``torchrun ... train DATASET -o OUTDIR --resume``).

Dropout and stochastic depth draw per rank (torch's RNG in step ``s`` on rank ``r`` is seeded from ``(seed, s, r)``):
a model with them trains like the single process in distribution, not bit for bit.

Python API::

    with distributed_training("auto") as context:  # None without torchrun
        trainer = Trainer(...)                       # built inside: data-parallel when context is not None
        trainer.train()
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from napari_mamba_seg.inference.device import select_device

__all__ = [
    "CURRENT",
    "DEFAULT_TIMEOUT",
    "DistributedContext",
    "GlobalBatchSampler",
    "OtherProcessFailed",
    "agreed_predicate",
    "all_reduce_metrics",
    "any_process",
    "check_global_batch",
    "current_context",
    "distributed_training",
    "gather_indexed",
    "gather_objects",
    "global_sum",
    "init_distributed",
    "is_main_process",
    "launched_world",
    "rank_slice",
    "run_main_first",
    "shutdown_distributed",
    "split_indices",
    "sync_buffers",
    "training_device",
    "wrap_model",
]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)
"""How long a collective waits for the other ranks (a validation share or a checkpoint write of rank 0 must fit)."""

Result = TypeVar("Result")
_ACTIVE: DistributedContext | None = None


class _Current:
    """The default of the helpers' ``context`` argument: the active context (:func:`current_context`)."""

    def __repr__(self) -> str:
        return "CURRENT"


CURRENT: Any = _Current()
"""``context=CURRENT`` (the default): the context of :func:`init_distributed`; pass a context, or None for a single
process, to pin a helper to a trainer's own context."""


def _resolve(context: Any) -> DistributedContext | None:
    return _ACTIVE if context is CURRENT else context


class OtherProcessFailed(RuntimeError):
    """Another rank failed where all ranks must succeed together (its message says which and why)."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the data-parallel group.

    Attributes:
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of processes.
        local_rank: Its rank on this machine (its GPU index on CUDA).
        device: Where it trains: ``cuda:local_rank`` or the CPU.
        backend: ``"nccl"`` or ``"gloo"``.
        control_group: The gloo group for CPU-side messages (None = the default group, when that is gloo).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes and prints)."""
        return self.rank == 0


# ------------------------------------------------------------------------------------------- set-up and teardown


def launched_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it.

    Raises:
        ValueError: ``WORLD_SIZE`` is set but ``RANK``/``LOCAL_RANK`` are missing or not valid integers.
    """
    world_text = os.environ.get("WORLD_SIZE")
    if world_text is None:
        return 0, 1, 0
    try:
        world = int(world_text)
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError(
            f"WORLD_SIZE={world_text!r} is set but RANK={os.environ.get('RANK')!r} / "
            f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} are not valid ranks; launch with torchrun, or unset "
            "WORLD_SIZE for a single process"
        ) from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}")
    return rank, world, local_rank


def init_distributed(
    device: str = "auto", *, init_method: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistributedContext | None:
    """Join the process group torchrun describes; None (nothing to do) for a single process.

    Args:
        device: The device asked for (``TrainingConfig.device``): ``"auto"`` and ``"cuda"`` give NCCL on
            ``cuda:LOCAL_RANK`` where CUDA works; ``"cpu"`` (or ``"auto"`` without CUDA) gives gloo on the CPU.
        init_method: Rendezvous URL; None = ``env://`` (``MASTER_ADDR``/``MASTER_PORT``, set by torchrun).
        timeout: How long a collective waits for the others.

    Returns:
        The context (also :func:`current_context` until :func:`shutdown_distributed`), or None when
        ``WORLD_SIZE`` is unset or 1.

    Raises:
        ValueError: A device that cannot be split between processes (``cuda:N``, ``mps``), more processes on a
            machine than GPUs, or an invalid torchrun environment.
        RuntimeError: Already initialised by other code.
    """
    global _ACTIVE
    rank, world, local_rank = launched_world()
    if world == 1:
        return None
    if _ACTIVE is not None or dist.is_initialized():
        raise RuntimeError("the process group is already initialised; call shutdown_distributed() first")
    process_device = _rank_device(device, local_rank, world)
    backend = "nccl" if process_device.type == "cuda" else "gloo"
    if process_device.type == "cuda":
        torch.cuda.set_device(process_device)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _ACTIVE = DistributedContext(rank, world, local_rank, process_device, backend, control)
    return _ACTIVE


def _rank_device(requested: str, local_rank: int, world: int) -> torch.device:
    text = str(requested).strip().lower()
    if text.startswith("cuda:"):
        raise ValueError(
            f"device {requested!r}: with {world} processes each one uses the GPU cuda:LOCAL_RANK; give --device "
            "cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    chosen = select_device(text)  # raises for an unknown or unavailable device
    if chosen.type == "mps":
        raise ValueError("data-parallel training on Apple's MPS is not supported; use --device cpu or one process")
    if chosen.type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but this machine has {count} CUDA device(s): start at most {count} processes "
            "per machine (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def shutdown_distributed() -> None:
    """Leave the process group (no-op without one)."""
    global _ACTIVE
    if _ACTIVE is not None and dist.is_initialized():
        dist.destroy_process_group()
    _ACTIVE = None


@contextlib.contextmanager
def distributed_training(device: str = "auto", **options: Any) -> Iterator[DistributedContext | None]:
    """:func:`init_distributed` for the duration of the block, then :func:`shutdown_distributed`."""
    context = init_distributed(device, **options)
    try:
        yield context
    finally:
        shutdown_distributed()


def current_context() -> DistributedContext | None:
    """The active context of :func:`init_distributed`, or None in a single process."""
    return _ACTIVE


def is_main_process(context: DistributedContext | None = CURRENT) -> bool:
    """True in rank 0 and in a single process."""
    context = _resolve(context)
    return context is None or context.is_main


def training_device(requested: str) -> torch.device:
    """The device a trainer uses: ``select_device(requested)``, or this rank's device when data-parallel.

    Raises:
        ValueError: The request and the process group disagree (e.g. ``"cpu"`` in an NCCL group).
    """
    context = current_context()
    if context is None:
        return select_device(requested)
    text = str(requested).strip().lower()
    wants_cuda = text.startswith("cuda") or (text == "auto" and torch.cuda.is_available())
    if wants_cuda != (context.device.type == "cuda"):
        raise ValueError(
            f"device {requested!r} does not match this process group's device {context.device} "
            f"({context.backend}); set up the group (init_distributed) with the same device as the training"
        )
    return context.device


# ------------------------------------------------------------------------------------------------------ batches


def check_global_batch(batch_size: int, world_size: int) -> int:
    """The per-rank batch ``batch_size // world_size``.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        lower = max(world_size, batch_size - batch_size % world_size)
        raise ValueError(
            f"the global batch size {batch_size} is not divisible by the number of processes {world_size}: every "
            f"process must draw the same number of patches; use --batch-size {lower} or "
            f"{lower + world_size}, or another number of processes"
        )
    return batch_size // world_size


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The positions ``[start, stop)`` of the global batch that ``rank`` draws (contiguous, equal shares).

    Raises:
        ValueError: ``batch_size`` not divisible by ``world_size``, or ``rank`` outside ``[0, world_size)``.
    """
    share = check_global_batch(batch_size, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return slice(rank * share, (rank + 1) * share)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per global step, the data-set indices this rank draws: ``step * batch_size + rank_slice(...)``.

    A batch sampler (``DataLoader(batch_sampler=...)``): one list of indices per step ``start_step ... end_step - 1``.

    Args:
        start_step: First global step.
        end_step: One past the last.
        batch_size: The global batch.
        rank: This rank.
        world_size: Number of ranks.
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start_step, self.end_step, self.batch_size = int(start_step), int(end_step), int(batch_size)
        self.positions = rank_slice(self.batch_size, rank, world_size)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            first = step * self.batch_size
            yield list(range(first + self.positions.start, first + self.positions.stop))


# -------------------------------------------------------------------------------------------------- collectives


class _GlobalSum(torch.autograd.Function):
    """Sum over the ranks; backward passes ``world_size`` times the gradient to the local term (module docstring)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        ctx.world_size = world_size
        total = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * ctx.world_size, None


def global_sum(tensor: torch.Tensor, context: DistributedContext | None = CURRENT) -> torch.Tensor:
    """``tensor`` summed over every rank (the same value on each), for a loss of the global batch.

    The gradient that reaches the local ``tensor`` is ``world_size`` times the incoming one: with DDP's average of
    the gradients over the ranks, the result is the gradient of the global loss, provided everything after the sum
    is computed identically on every rank (it is: it depends on global sums only). Without a process group: the
    tensor itself.

    Args:
        tensor: Any shape; on this rank's device.
        context: The process group's context (default: the active one).

    Returns:
        The same shape.
    """
    context = _resolve(context)
    if context is None:
        return tensor
    return _GlobalSum.apply(tensor, context.world_size)


def any_process(flag: bool, context: DistributedContext | None = CURRENT) -> bool:
    """Whether ``flag`` is True on any rank (a collective: every rank must call it at the same point)."""
    context = _resolve(context)
    if context is None:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=context.control_group)
    return bool(value.item())


def agreed_predicate(
    is_cancelled: Callable[[], bool], context: DistributedContext | None = CURRENT
) -> Callable[[], bool]:
    """``is_cancelled`` made collective: True on every rank when it is True on any (each call is a collective)."""
    context = _resolve(context)
    if context is None:
        return is_cancelled
    return lambda: any_process(is_cancelled(), context)


def gather_objects(value: Any, context: DistributedContext | None = CURRENT) -> list[Any]:
    """Every rank's (picklable) ``value``, in rank order (a collective); ``[value]`` in a single process."""
    context = _resolve(context)
    if context is None:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value, group=context.control_group)
    return gathered


def gather_indexed(
    items: Sequence[tuple[int, Any]], cancelled: bool = False, context: DistributedContext | None = CURRENT
) -> tuple[list[Any], bool]:
    """Every rank's ``(index, value)`` pairs merged and sorted by index, and whether any rank was cancelled.

    A collective (every rank calls it at the same point); in a single process the values of ``items`` in index
    order.

    Returns:
        ``(values, cancelled)``, the same on every rank.
    """
    merged: list[tuple[int, Any]] = []
    any_cancelled = False
    for rank_items, rank_cancelled in gather_objects((list(items), bool(cancelled)), context):
        merged.extend(rank_items)
        any_cancelled = any_cancelled or rank_cancelled
    merged.sort(key=lambda pair: pair[0])
    return [value for _, value in merged], any_cancelled


def all_reduce_metrics(
    values: Mapping[str, float], op: str = "mean", context: DistributedContext | None = CURRENT
) -> dict[str, float]:
    """Per-rank numbers combined over the ranks (a collective; every rank passes the same keys).

    Args:
        values: Name -> number on this rank.
        op: ``"mean"``, ``"sum"``, ``"max"`` or ``"min"``.

    Returns:
        Name -> the combined number (float64), the same on every rank.
    """
    operations = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    operations["min"] = dist.ReduceOp.MIN
    if op not in operations:
        raise ValueError(f"op must be one of {', '.join(operations)}, got {op!r}")
    keys = sorted(values)
    context = _resolve(context)
    if context is None or not keys:
        return {key: float(values[key]) for key in keys}
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64)
    dist.all_reduce(tensor, op=operations[op], group=context.control_group)
    if op == "mean":
        tensor /= context.world_size
    return {key: float(value) for key, value in zip(keys, tensor.tolist(), strict=True)}


def sync_buffers(model: nn.Module, context: DistributedContext | None = CURRENT) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so all ranks hold the same model."""
    context = _resolve(context)
    if context is None:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def run_main_first(build: Callable[[], Result], context: DistributedContext | None = CURRENT) -> Result:
    """``build()`` on rank 0, then on the other ranks (after rank 0 finished: no two ranks clean a folder at once).

    Every rank fails together: the rank whose ``build`` raised re-raises its error, the others raise
    :class:`OtherProcessFailed` naming the failed rank and its error. In a single process: ``build()``.
    """
    context = _resolve(context)
    if context is None:
        return build()
    result: Any = None
    error: Exception | None = None
    if context.is_main:
        result, error = _attempt(build)
    main_failed = gather_objects(_describe(error) if context.is_main else None, context)[0]
    if main_failed is not None:
        if error is not None:
            raise error
        raise OtherProcessFailed(f"process 0 of {context.world_size} failed: {main_failed}")
    if not context.is_main:
        result, error = _attempt(build)
    failures = gather_objects(_describe(error), context)
    if error is not None:
        raise error
    for rank, message in enumerate(failures):
        if message is not None:
            raise OtherProcessFailed(f"process {rank} of {context.world_size} failed: {message}")
    return result


def _attempt(build: Callable[[], Result]) -> tuple[Result | None, Exception | None]:
    try:
        return build(), None
    except Exception as error:  # handed to every rank, then re-raised
        return None, error


def _describe(error: Exception | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------------- models


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``model`` (already on ``context.device``) wrapped in DistributedDataParallel; BatchNorm synchronised on CUDA.

    DDP broadcasts rank 0's parameters and buffers now, so every rank starts from the same weights.
    """
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms and context.device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the child modules in place (the root is no BN)
    elif batch_norms and context.is_main:
        warnings.warn(
            f"{type(model).__name__} has {len(batch_norms)} BatchNorm layer(s): on the CPU they normalise with the "
            f"statistics of each process's share (1/{context.world_size}) of the batch (torch's SyncBatchNorm needs "
            "CUDA), so training differs from one process with the whole batch",
            RuntimeWarning,
            stacklevel=2,
        )
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)  # buffers follow rank 0 at each step


def split_indices(count: int, context: DistributedContext | None = CURRENT) -> Sequence[int]:
    """The indices of ``count`` items (e.g. validation cases) this rank handles: ``rank, rank + W, ...``."""
    context = _resolve(context)
    if context is None:
        return range(count)
    return range(context.rank, count, context.world_size)

"""Size, cost, speed and memory of every registered full-size architecture, beside the papers' figures.

For each model (default config: 1 input channel, 2 classes, float32) the table gives:

- parameters, and the paper's count beside ours with the ratio ours/paper;
- GMACs of one forward at 256² (3D models: 128³): multiply-accumulates, which is what papers call
  "GFLOPs" (thop and fvcore count one per multiply-add); FLOPs are twice this. Counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, attention; not norms, activations or
  other elementwise ops) on a copy of the model on the meta device, so nothing is computed. The
  selective scan is a custom kernel that the counter cannot see, so ``selective_scan`` is replaced
  during the count by a shape-only stub that adds 9 FLOPs (4.5 MACs) per (batch, dim, N, L) element
  (``dt*A``, ``exp``, two multiply-adds for the state, one multiply-add for the output) plus 2 FLOPs
  per (batch, dim, L) element for each of ``D`` and ``z``. The paper's GFLOPs are compared with
  ours counted at the paper's input size. (VMamba-derived code adds 9·BDNL per scan to a MAC tally,
  i.e. counts the scan twice as heavy as here.)
- latency: median wall time of ``--repeats`` forwards after one warm-up, batch 1, eval mode, no_grad,
  ``--threads`` intra-op threads (the cpu scan backend follows them). 2D models: one 256² slice;
  3D models: one ``--latency-size-3d``³ volume (64³ by default: a 128³ forward costs 8× as much,
  tens of seconds on 2 cores; the table names the size);
- peak forward memory: what the forward allocates on top of the weights and the input, in MiB. On
  CPU from ``torch.profiler``'s memory events (tensors only; buffers the numba scan allocates itself
  are not seen), on CUDA from ``torch.cuda.max_memory_allocated``; measured on the warm-up forward;
- "CPU-friendly": at most 0.25 s per 256² single-channel slice on the CPU (issue 3, acceptance 4).

Usage:
    python benchmarks/models.py                                     # CPU, 2 threads, every model
    python benchmarks/models.py --models unet ultralight_vm_unet --repeats 3
    python benchmarks/models.py --device cuda --latency-size-3d 128  # GPU: triton scan
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_mamba_seg.kernels import dispatch, resolve_backend
from napari_mamba_seg.models import create_model, get_model_entry, list_models, set_scan_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import machine_description, time_call

CPU_FRIENDLY_S = 0.25
"""Latency limit per 256² single-channel slice on the CPU for the "CPU-friendly" column."""


def measure_model(
    name: str,
    *,
    device: str = "cpu",
    size: int = 256,
    size_3d: int = 128,
    latency_size_3d: int = 64,
    repeats: int = 5,
    scan_backend: str = "auto",
) -> dict:
    """One table row: parameters, GMACs, latency and peak forward memory of the registered model ``name``.

    Args:
        name: Registry name, e.g. ``"vm_unet"``.
        device: ``"cpu"`` or ``"cuda"``.
        size: Side of the 2D input for GMACs and latency.
        size_3d: Side of the 3D input for GMACs.
        latency_size_3d: Side of the 3D input for latency and memory.
        repeats: Timed forwards (median taken), after one warm-up.
        scan_backend: Selective-scan backend of the model's scan layers.

    Returns:
        ``{"name", "dims", "params", "gmacs", "gmacs_at_paper", "latency_s", "latency_shape", "peak_mib",
        "paper", "description"}``; ``gmacs_at_paper`` is None when the paper states no GFLOPs.
    """
    entry = get_model_entry(name)
    model = set_scan_backend(create_model(name), scan_backend).eval()
    dims = entry.spatial_dims
    count_shape = (size,) * 2 if dims == 2 else (size_3d,) * 3
    latency_shape = (size,) * 2 if dims == 2 else (latency_size_3d,) * 3
    paper = entry.paper
    gmacs = count_gmacs(model, count_shape)
    gmacs_at_paper = None
    if paper is not None and paper.gflops is not None:
        paper_shape = tuple(paper.input_size) if paper.input_size else count_shape
        gmacs_at_paper = gmacs if paper_shape == count_shape else count_gmacs(model, paper_shape)

    model = model.to(device)
    x = torch.randn(1, model.in_channels, *latency_shape, device=device)
    with torch.no_grad():
        peak = forward_peak_bytes(model, x)  # also the warm-up
        latency = time_call(lambda: model(x), torch.device(device), repeats, warmup=0)
    return {
        "name": name,
        "dims": dims,
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": gmacs,
        "gmacs_at_paper": gmacs_at_paper,
        "latency_s": latency,
        "latency_shape": latency_shape,
        "peak_mib": peak / 2**20,
        "paper": paper,
        "description": entry.description,
    }


def count_gmacs(model: torch.nn.Module, spatial_shape: tuple[int, ...], include_scan: bool = True) -> float:
    """Multiply-accumulates (in units of 10⁹) of one forward of a batch-1 input, the selective scan included.

    Runs on a copy of ``model`` on the meta device (no computation) with ``selective_scan`` replaced by a
    shape-only stub; ``forward_features`` is called on the input padded to the model's size divisor.

    Args:
        model: A registered architecture.
        spatial_shape: ``(H, W)`` or ``(D, H, W)``.
        include_scan: Add the scan's multiply-accumulates (turn off to see what the counter alone finds).

    Returns:
        GMACs (FlopCounterMode's FLOPs plus the scan's, halved).
    """
    meta_model = copy.deepcopy(model).to("meta").eval()
    padded = [math.ceil(s / d) * d for s, d in zip(spatial_shape, meta_model.size_divisor, strict=True)]
    x = torch.empty(1, meta_model.in_channels, *padded, device="meta")
    scan_flops = [0]
    with _counting_scan(scan_flops), FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model.forward_features(x)
    total = counter.get_total_flops() + (scan_flops[0] if include_scan else 0)
    return total / 2e9


@contextlib.contextmanager
def _counting_scan(tally: list[int]) -> Iterator[None]:
    """Within the block, every module's ``selective_scan`` is a shape-only stub that adds the scan's FLOPs to
    ``tally[0]`` (the layers import the function by name, so each importing module is patched)."""
    original = dispatch.selective_scan

    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
             backend="auto"):  # fmt: skip
        batch, dim, length = u.shape
        state = A.shape[1]
        tally[0] += 9 * batch * dim * state * length + 2 * batch * dim * length * ((D is not None) + (z is not None))
        out = torch.zeros_like(u)
        return (out, u.new_zeros(batch, dim, state, dtype=torch.float32)) if return_last_state else out

    patched = [m for m in list(sys.modules.values()) if getattr(m, "selective_scan", None) is original]
    for module in patched:
        module.selective_scan = scan
    try:
        yield
    finally:
        for module in patched:
            module.selective_scan = original


def forward_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated during ``model(x)`` on top of what was allocated before (call under no_grad)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        model(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        model(x)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Print the markdown table, the paper sources and the CPU-friendly verdict."""
    on_cpu = args.device == "cpu"
    backend = resolve_backend(args.scan_backend, args.device)
    print()
    print(
        f"full-size models, batch 1, float32, device {args.device}, scan backend {backend}, "
        f"latency = median of {args.repeats} after 1 warm-up"
    )
    print(f"machine: {machine_description(args.device)}; {datetime.date.today().isoformat()}")
    print("GMACs = multiply-accumulates / 10⁹ (what papers report as GFLOPs; FLOPs = 2 × MACs), scan included")
    print()
    size2, size3 = f"{args.size}²", f"{args.size_3d}³"
    print(
        f"| architecture | dims | params (M) | paper params (M) | params ours/paper | GMACs at {size2} (3D {size3}) "
        f"| paper GFLOPs (input) | GFLOPs ours/paper | latency input | latency (s) | peak forward memory (MiB) "
        f"| CPU-friendly (≤ {CPU_FRIENDLY_S} s per 256² slice) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        paper = row["paper"]
        params_m = row["params"] / 1e6
        paper_params = paper.params_m if paper else None
        paper_gflops = paper.gflops if paper else None
        paper_input = "×".join(map(str, paper.input_size)) if paper and paper.input_size else "?"
        if row["dims"] == 3:
            friendly = "n/a (3D)"
        elif not on_cpu or args.size != 256:
            friendly = "n/a (not CPU at 256²)"
        else:
            friendly = "yes" if row["latency_s"] <= CPU_FRIENDLY_S else "no"
        row["cpu_friendly"] = friendly == "yes"
        print(
            f"| {row['name']} | {row['dims']}D | {params_m:.3f} | {_fmt(paper_params)} "
            f"| {_ratio(params_m, paper_params)} | {row['gmacs']:.3f} "
            f"| {f'{paper_gflops} ({paper_input})' if paper_gflops else '–'} "
            f"| {_ratio(row['gmacs_at_paper'], paper_gflops)} | {'×'.join(map(str, row['latency_shape']))} "
            f"| {row['latency_s']:.3f} | {row['peak_mib']:.0f} | {friendly} |"
        )
    print()
    for row in rows:
        source = row["paper"].source if row["paper"] else "no paper figures"
        print(f"- {row['name']}: {row['description']} Paper: {source}.")
    print()
    friendly = [row["name"] for row in rows if row["cpu_friendly"]]
    verdict = ", ".join(friendly) if friendly else "none of the measured architectures"
    if on_cpu and args.size == 256:
        print(f"CPU-friendly (≤ {CPU_FRIENDLY_S} s per 256² slice, {args.threads} threads): {verdict}")
    else:
        print("CPU-friendly: not judged (needs --device cpu --size 256)")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _ratio(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or not paper else f"{ours / paper:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="registry names (default: every full-size architecture)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="2D input side for GMACs and latency")
    parser.add_argument("--size-3d", type=int, default=128, help="3D input side for GMACs")
    parser.add_argument("--latency-size-3d", type=int, default=64, help="3D input side for latency and memory")
    parser.add_argument("--scan-backend", default="auto")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure the chosen models, print the table and return its rows."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models or list_models():
        row = measure_model(
            name,
            device=args.device,
            size=args.size,
            size_3d=args.size_3d,
            latency_size_3d=args.latency_size_3d,
            repeats=args.repeats,
            scan_backend=args.scan_backend,
        )
        print(f"  {name}: {row['params'] / 1e6:.2f} M, {row['gmacs']:.2f} GMACs, {row['latency_s']:.3f} s", flush=True)
        rows.append(row)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()

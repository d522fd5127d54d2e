"""Time every selective-scan backend side by side on the SS2D shape of a 256x256 image.

The default shape is what VM-UNet's first stage scans for one 256x256 slice: batch 1,
dim 768 (4 directions x 192 channels), N 16, L 4096 (64x64 tokens), B/C in 4 groups
(one per direction), softplus with delta_bias, and D. Each backend is timed forward
and forward+backward in the same run, next to a plain sequential PyTorch loop (state
``(batch, dim, N)``, one step per position), and the table gives the speed-ups over
that loop.

Usage:
    python benchmarks/scan.py                  # CPU, every available backend
    python benchmarks/scan.py --device cuda    # GPU: triton, mamba_ssm, loop
    python benchmarks/scan.py --length 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from napari_mamba_seg.kernels import available_backends, selective_scan
from napari_mamba_seg.kernels.testing import random_scan_inputs


def plain_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The plain sequential PyTorch loop in the input dtype: state ``(batch, dim, N)``, one step per position.

    Written the way a careful user would: the sequence is split once with ``unbind`` (whose
    backward is one stack) and each step's B and C rows are broadcast to their channels.
    """
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    dt = F.softplus(delta) if delta_softplus else delta
    groups = 1 if B.dim() == 3 else B.shape[1]
    B = B.reshape(batch, groups, 1, -1, length)
    C = C.reshape(batch, groups, 1, -1, length)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for u_t, dt_t, B_t, C_t in zip(u.unbind(-1), dt.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        B_t = B_t.expand(-1, -1, dim // groups, -1).reshape(batch, dim, -1)
        C_t = C_t.expand(-1, -1, dim // groups, -1).reshape(batch, dim, -1)
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    inputs = random_scan_inputs(
        args.batch, args.dim, args.state, args.length, args.groups, with_z=False, dtype=dtype, device=device, seed=0
    )
    candidates = {"plain loop": None} | {
        name: None for name, reason in available_backends(device).items() if reason is None
    }
    if args.backends:
        candidates = {name: None for name in candidates if name in args.backends or name == "plain loop"}

    rows = []
    for name in candidates:
        slow = name in ("plain loop", "reference")
        repeats = max(1, args.repeats // 5) if slow else args.repeats
        fwd, both = time_backend(scan_function(name), inputs, device, repeats)
        rows.append({"backend": name, "forward_s": fwd, "forward_backward_s": both})
        print(f"  timed {name}: forward {fwd * 1e3:.2f} ms, forward+backward {both * 1e3:.2f} ms", flush=True)
    return rows


def scan_function(name: str) -> Callable[..., torch.Tensor]:
    """The scan to time: the plain loop or a backend of ``selective_scan``, softplus on."""
    if name == "plain loop":
        return lambda **inputs: plain_loop_scan(**inputs, delta_softplus=True)
    return lambda **inputs: selective_scan(**inputs, delta_softplus=True, backend=name)


def time_backend(scan: Callable[..., torch.Tensor], inputs: dict, device: torch.device, repeats: int):
    """Median forward time and forward+backward time of ``scan`` on ``inputs``, in seconds."""
    fwd = time_call(lambda: scan(**inputs), device, repeats)
    grad_inputs = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    grad_out = torch.randn_like(inputs["u"])
    both = time_call(lambda: torch.autograd.backward(scan(**grad_inputs), grad_out), device, repeats)
    return fwd, both


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    loop = next(r for r in rows if r["backend"] == "plain loop")
    print()
    print(
        f"selective scan, batch {args.batch}, dim {args.dim}, N {args.state}, L {args.length}, "
        f"groups {args.groups}, softplus + delta_bias, D, {args.dtype}, device {args.device}"
    )
    print(f"machine: {machine_description(args.device)}; {datetime.date.today().isoformat()}")
    print()
    print("| backend | forward (ms) | forward+backward (ms) | forward speed-up vs loop | fwd+bwd speed-up vs loop |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['forward_s'] * 1e3:.2f} | {row['forward_backward_s'] * 1e3:.2f} "
            f"| {loop['forward_s'] / row['forward_s']:.1f}x "
            f"| {loop['forward_backward_s'] / row['forward_backward_s']:.1f}x |"
        )


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backends", nargs="*", help="only these backends (the plain loop is always timed)")
    args = parser.parse_args()
    rows = benchmark(args)
    print_table(rows, args)


if __name__ == "__main__":
    main()

"""Triton selective-scan backend against the float64 reference.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), so the sizes stay small: the interpreter
runs ``tl.associative_scan`` element by element in Python. The cases form a covering design over batch, dim, state
size, length, grouping and the optional arguments (every value of every factor appears at least once), plus one case
in the range of trained models (``A`` down to -16, ``dt`` up to 5). The ``gpu`` tests repeat the comparisons
compiled on CUDA at realistic sizes and in float16 / bfloat16.

``TRITON_INTERPRET=1`` is set below before this module imports triton, on machines without CUDA (CI), and put
back as it was once the imports are done, so that test modules collected after this one do not see the Triton
backend as available on the CPU. Each CPU test turns the interpreter on for its own duration (autouse fixture);
that works whatever the import order because ``triton_scan`` picks interpreter or compiler at launch time and uses
no triton.language @jit helper. Where CUDA is available it is not set at import, so that the ``gpu`` tests can
compile (triton cannot compile for the GPU in a process that imported it under the interpreter).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch  # does not import triton

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything below imports triton

pytest.importorskip("triton", reason="the Triton backend needs triton (pip install triton; Linux x86_64)")

from napari_mamba_seg.kernels import triton_scan  # noqa: E402
from napari_mamba_seg.kernels.reference import selective_scan_reference  # noqa: E402
from napari_mamba_seg.kernels.triton_scan import selective_scan_triton, triton_unavailable_reason  # noqa: E402

if _INTERPRET_BEFORE is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OUT_RTOL = 1e-4  # relative L2 error of out and the last state, float32 inputs
GRAD_RTOL = 1e-3  # relative L2 error of every gradient, float32 inputs


@dataclasses.dataclass(frozen=True)
class Case:
    """One selective-scan configuration; ``groups=None`` means ungrouped B/C of shape (b, N, L)."""

    batch: int
    dim: int
    state: int
    length: int
    groups: int | None
    has_D: bool
    has_z: bool
    has_bias: bool
    softplus: bool
    last_state: bool
    seed: int
    noncontig: bool = False  # u, B, C as strided views (stride along L != 1)
    trained: bool = False  # A in [-16, -0.01], dt = delta in [0, 5], no softplus
    block_l: int | None = None  # override the kernel's largest chunk, to put several chunks in a short sequence

    def __str__(self) -> str:
        flags = "".join(
            k for k, v in (("D", self.has_D), ("z", self.has_z), ("b", self.has_bias), ("s", self.softplus)) if v
        )
        extra = "".join(
            (
                "-last" if self.last_state else "",
                "-nc" if self.noncontig else "",
                "-trained" if self.trained else "",
                f"-bl{self.block_l}" if self.block_l else "",
            )
        )
        return f"b{self.batch}d{self.dim}n{self.state}l{self.length}g{self.groups}-{flags or 'plain'}{extra}"


# Covering design: batch {1, 2}, dim {4, 8}, N {1, 8, 16}, L {1, 7, 128, 300}, grouped/ungrouped, each optional
# argument on and off, return_last_state on and off. L = 300 spans several chunks (3 of 128 for N <= 8, 5 of 64 for
# N = 16) and is not a multiple of the chunk; L = 128 with N = 16 is exactly two chunks of 64, and the block_l=32
# case puts four full chunks in L = 128 (a chunk boundary exactly at L).
CPU_CASES = [
    Case(1, 4, 1, 300, None, True, False, True, True, True, seed=1),
    Case(2, 8, 16, 7, 4, False, True, False, False, True, seed=2),
    Case(2, 4, 8, 128, 2, True, True, True, True, False, seed=3, noncontig=True),
    Case(1, 8, 16, 1, None, False, False, True, False, False, seed=4),
    Case(1, 8, 8, 300, 2, True, True, False, True, True, seed=5),
    Case(2, 4, 16, 128, 4, True, True, True, True, True, seed=6),
    Case(1, 4, 8, 7, None, False, False, False, False, False, seed=7),
    Case(2, 8, 1, 128, 8, True, True, True, True, True, seed=8, block_l=32),
    Case(2, 4, 1, 1, 2, True, True, True, True, True, seed=9),
]
TRAINED_CASE = Case(1, 4, 16, 200, None, True, True, False, False, True, seed=10, trained=True)


def make_inputs(case: Case, device: str | torch.device = "cpu", itype: torch.dtype = torch.float32) -> dict:
    """Fresh random inputs like mamba_ssm's tests, seeded per case.

    ``u, delta, B, C, z`` come in ``itype``; the weights ``A, D, delta_bias`` stay float32 (as in mamba_ssm).
    """
    gen = torch.Generator().manual_seed(case.seed)
    b, d, n, length = case.batch, case.dim, case.state, case.length
    bc_shape = (b, n, length) if case.groups is None else (b, case.groups, n, length)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float32)

    def strided(shape):
        # a (…, L, N) buffer seen as (…, N, L): L is not the innermost (contiguous) dimension
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return randn(*swapped).transpose(-1, -2)

    if case.noncontig:
        u = randn(b, length, d).transpose(1, 2)
        B, C = strided(bc_shape), strided(bc_shape)
    else:
        u, B, C = randn(b, d, length), randn(*bc_shape), randn(*bc_shape)
    if case.trained:
        A = -(0.01 + 15.99 * rand(d, n))
        delta = 5.0 * rand(b, d, length)
    else:
        A = -(0.5 + rand(d, n))
        delta = 0.5 * rand(b, d, length)
    inputs = {
        "u": u.to(itype),
        "delta": delta.to(itype),
        "A": A,
        "B": B.to(itype),
        "C": C.to(itype),
        "D": randn(d) if case.has_D else None,
        "z": randn(b, d, length).to(itype) if case.has_z else None,
        "delta_bias": 0.5 * rand(d) if case.has_bias else None,
    }
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (absolute error where ``ref`` is exactly zero)."""
    x, ref = x.detach().double(), ref.detach().double()
    ref_norm = ref.norm().item()
    return (x - ref).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def run_both(case: Case, device="cpu", itype=torch.float32):
    """Forward and backward through the Triton backend and the float64 reference on the same inputs.

    Returns:
        ``(tri, ref, tri_inputs, ref_inputs)`` where ``tri``/``ref`` are ``(out, last_state or None)``.
    """
    inputs = make_inputs(case, device, itype)
    tri_in = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_in = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    kwargs = {"delta_softplus": case.softplus, "return_last_state": case.last_state}
    tri = selective_scan_triton(**tri_in, **kwargs)
    ref = selective_scan_reference(**ref_in, **kwargs)
    tri = tri if case.last_state else (tri, None)
    ref = ref if case.last_state else (ref, None)

    gen = torch.Generator().manual_seed(1000 + case.seed)
    g_out = torch.randn(tri[0].shape, generator=gen).to(device=device, dtype=itype)
    loss_tri = (tri[0] * g_out).float().sum()
    loss_ref = (ref[0] * g_out.double()).sum()
    if case.last_state:
        g_last = torch.randn(tri[1].shape, generator=gen).to(device)
        loss_tri = loss_tri + (tri[1] * g_last).sum()
        loss_ref = loss_ref + (ref[1] * g_last.double()).sum()
    loss_tri.backward()
    loss_ref.backward()
    return tri, ref, tri_in, ref_in


def errors(case: Case, device="cpu", itype=torch.float32) -> dict[str, float]:
    """Relative L2 errors of out, last state and every gradient for one case."""
    return errors_of(case, *run_both(case, device, itype))


def errors_of(case: Case, tri, ref, tri_in, ref_in) -> dict[str, float]:
    """Relative L2 errors of out, last state and every gradient, from :func:`run_both`'s results."""
    itype = tri_in["u"].dtype
    assert tri[0].dtype == itype and tri[0].shape == ref[0].shape
    errs = {"out": rel_err(tri[0], ref[0])}
    if case.last_state:
        assert tri[1].dtype == torch.float32
        errs["last_state"] = rel_err(tri[1], ref[1])
    for name in GRAD_NAMES:
        if tri_in[name] is None:
            continue
        grad = tri_in[name].grad
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == tri_in[name].dtype and grad.shape == tri_in[name].shape, name
        errs[f"d{name}"] = rel_err(grad, ref_in[name].grad)
    return errs


@pytest.fixture(autouse=True)
def _interpreter_for_cpu_tests(request, monkeypatch):
    """CPU tests run the kernels in Triton's interpreter; ``gpu`` tests set TRITON_INTERPRET=0 themselves."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def block_l(request, monkeypatch):
    """Apply a case's ``block_l`` override to the kernel module for the duration of the test."""
    case = request.node.callspec.params["case"]
    if case.block_l:
        monkeypatch.setattr(triton_scan, "_MAX_BLOCK_L", case.block_l)
    return case.block_l


def test_runs_in_the_interpreter_on_cpu():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert triton_unavailable_reason(torch.device("cpu")) is None
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(triton_scan._kernel("fwd", torch.device("cpu")), InterpretedFunction)
    assert isinstance(triton_scan._kernel("bwd", torch.device("cpu")), InterpretedFunction)


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_reference_fp32(case: Case, block_l):
    errs = errors(case)
    bad = {k: v for k, v in errs.items() if not (v <= (OUT_RTOL if k in ("out", "last_state") else GRAD_RTOL))}
    assert not bad, f"{case}: relative errors over tolerance: {bad} (all: {errs})"


def test_trained_model_range_is_finite_and_accurate():
    """A in [-16, -0.01] and dt up to 5: decays underflow towards 0 without inf/nan anywhere."""
    tri, ref, tri_in, ref_in = run_both(TRAINED_CASE)
    assert torch.isfinite(tri[0]).all() and torch.isfinite(tri[1]).all()
    for name in GRAD_NAMES:
        if tri_in[name] is not None:
            assert torch.isfinite(tri_in[name].grad).all(), name
    assert rel_err(tri[0], ref[0]) <= OUT_RTOL
    assert rel_err(tri[1], ref[1]) <= OUT_RTOL
    for name in GRAD_NAMES:
        if tri_in[name] is not None:
            err = rel_err(tri_in[name].grad, ref_in[name].grad)
            assert err <= GRAD_RTOL, f"d{name}: {err}"


@pytest.mark.parametrize(("itype", "rtol", "atol"), [(torch.float16, 3e-3, 5e-3), (torch.bfloat16, 3e-2, 5e-2)])
def test_half_precision_inputs(itype, rtol, atol):
    """fp16/bf16 inputs: output and gradients in the input dtype, state and accumulation in float32."""
    case = Case(2, 4, 8, 20, 2, True, True, True, True, True, seed=11)
    tri, ref, tri_in, ref_in = run_both(case, itype=itype)
    assert tri[0].dtype == itype and tri[1].dtype == torch.float32
    torch.testing.assert_close(tri[0].double(), ref[0].double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(tri[1].double(), ref[1].double(), rtol=rtol, atol=atol)
    for name in GRAD_NAMES:
        grad = tri_in[name].grad
        assert grad.dtype == tri_in[name].dtype, name
        torch.testing.assert_close(grad.double(), ref_in[name].grad, rtol=2 * rtol, atol=2 * atol, msg=name)


def test_no_grad_forward_skips_saved_states(monkeypatch):
    """Under torch.no_grad() the chunk states are not saved, even for inputs that require grad."""
    monkeypatch.setattr(triton_scan, "_MAX_BLOCK_L", 16)
    calls = []
    forward = triton_scan._forward

    def spy(*args):
        calls.append(args[-1])  # save_states
        return forward(*args)

    monkeypatch.setattr(triton_scan, "_forward", spy)
    x = make_inputs(Case(1, 4, 8, 40, None, True, True, True, True, True, seed=12))
    x = {k: v.requires_grad_() for k, v in x.items()}
    with torch.no_grad():
        out, last = selective_scan_triton(**x, delta_softplus=True, return_last_state=True)
        ref_out, ref_last = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    assert calls == [False] and not out.requires_grad
    assert rel_err(out, ref_out) <= OUT_RTOL and rel_err(last, ref_last) <= OUT_RTOL


def test_empty_sequence():
    x = make_inputs(Case(2, 4, 8, 0, None, True, True, True, True, True, seed=13))
    out, last = selective_scan_triton(**x, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 4, 0) and last.shape == (2, 4, 8) and not last.any()


def test_float64_is_rejected():
    x = make_inputs(Case(1, 4, 8, 7, None, False, False, False, False, False, seed=14))
    x["u"] = x["u"].double()
    with pytest.raises(TypeError, match=r"float64.*backend='reference' or 'cpu'"):
        selective_scan_triton(**x)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = triton_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    x = make_inputs(Case(1, 4, 8, 7, None, False, False, False, False, False, seed=15))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan_triton(**x)
    assert triton_unavailable_reason(torch.device("meta")) is not None
    if not torch.cuda.is_available():
        assert "CUDA" in triton_unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(triton_scan, "triton", None)
    assert "pip install triton" in triton_unavailable_reason(torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes, float32 / float16 / bfloat16 with mamba_ssm's tolerances.
# ------------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(2, 64, 16, 4096, None, True, True, True, True, True, seed=21),
    Case(2, 64, 16, 16384, 4, True, True, True, True, True, seed=22),
    Case(1, 64, 16, 4096, 2, False, False, False, True, False, seed=23, trained=False, noncontig=True),
]
# (rtol, atol) from mamba_ssm's tests/ops/test_selective_scan.py; gradients get twice these.
GPU_TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("itype", list(GPU_TOLERANCES), ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(case: Case, itype: torch.dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compile for the GPU even though this module set it for CPU
    assert triton_unavailable_reason(torch.device("cuda")) is None
    rtol, atol = GPU_TOLERANCES[itype]
    tri, ref, tri_in, ref_in = run_both(case, device="cuda", itype=itype)
    torch.testing.assert_close(tri[0].double(), ref[0].double(), rtol=rtol, atol=atol, msg="out")
    if case.last_state:
        torch.testing.assert_close(tri[1].double(), ref[1].double(), rtol=rtol, atol=atol, msg="last_state")
    for name in GRAD_NAMES:
        if tri_in[name] is None:
            continue
        grad = tri_in[name].grad
        assert grad.dtype == tri_in[name].dtype, name
        torch.testing.assert_close(grad.double(), ref_in[name].grad, rtol=2 * rtol, atol=2 * atol, msg=f"d{name}")
    if itype == torch.float32:
        errs = errors_of(case, tri, ref, tri_in, ref_in)
        over = {k: v for k, v in errs.items() if v > (OUT_RTOL if k in ("out", "last_state") else GRAD_RTOL)}
        assert not over, f"relative errors over tolerance: {over}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_trained_range_long_sequence(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case(1, 64, 16, 16384, None, True, True, False, False, True, seed=24, trained=True)
    errs = errors(case, device="cuda")
    over = {k: v for k, v in errs.items() if not v <= (OUT_RTOL if k in ("out", "last_state") else GRAD_RTOL)}
    assert not over, f"relative errors over tolerance: {over}"

"""Tri-orientated Mamba (ToM) of SegMamba (Xing et al. 2024): one Mamba mixer scanning a volume's tokens three ways.

The tokens of a ``(D, H, W)`` volume, flattened row-major (W fastest, slices D slowest), are scanned

* forward: in the flattened order;
* reverse: in the reversed order;
* inter-slice: slice index fastest, i.e. through all D slices at one in-plane position, then the next position.

The three directions share the input and output projections (and the SiLU gate) and each has its own causal
convolution, ``x_proj``, ``dt_proj``, ``A`` and ``D``, as in SegMamba's released ``Mamba(bimamba_type="v3")``.
The three scans run as one grouped selective scan (``groups = 3``); their outputs are put back in the flattened
order and summed before the output projection. The per-direction parameters are stacked in the order of
:data:`DIRECTIONS` (released names ``conv1d``/``conv1d_b``/``conv1d_s``, ``x_proj``/``x_proj_b``/``x_proj_s``, ...
map to rows 0/1/2 of ``conv1d_weight``, ``x_proj_weight``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models.layers.mamba import init_direction_params, resolve_dt_rank, scan_directions

__all__ = ["DIRECTIONS", "TriOrientedMamba", "inter_slice_order", "inter_slice_restore", "orient", "restore"]

DIRECTIONS = ("forward", "reverse", "inter_slice")


def inter_slice_order(seq: torch.Tensor, slices: int) -> torch.Tensor:
    """Reorder ``(..., L)`` from slice-major (``L = slices * plane``) to slice-fastest order: ``(..., L)``.

    Position ``d * plane + p`` moves to ``p * slices + d``.
    """
    return seq.unflatten(-1, (slices, -1)).transpose(-1, -2).flatten(-2)


def inter_slice_restore(seq: torch.Tensor, slices: int) -> torch.Tensor:
    """Inverse of :func:`inter_slice_order`: ``(..., L)`` in slice-fastest order back to slice-major order."""
    return seq.unflatten(-1, (-1, slices)).transpose(-1, -2).flatten(-2)


def orient(seq: torch.Tensor, direction: str, slices: int) -> torch.Tensor:
    """The scan order ``direction`` (one of :data:`DIRECTIONS`) of a slice-major sequence ``(..., L)``."""
    if direction == "forward":
        return seq
    if direction == "reverse":
        return seq.flip(-1)
    return inter_slice_order(seq, slices)


def restore(seq: torch.Tensor, direction: str, slices: int) -> torch.Tensor:
    """Inverse of :func:`orient`: a sequence ``(..., L)`` in ``direction``'s order back to slice-major order."""
    if direction == "forward":
        return seq
    if direction == "reverse":
        return seq.flip(-1)
    return inter_slice_restore(seq, slices)


class TriOrientedMamba(nn.Module):
    """Mamba mixer over a volume's tokens in three scan orders (forward, reverse, inter-slice), summed.

    Args:
        d_model: Token channels C.
        d_state: SSM state size N.
        d_conv: Causal convolution width.
        expand: Inner channels = ``expand * d_model``.
        dt_rank: Rank of the dt projections; ``"auto"`` is ``ceil(d_model / 16)``.
        scan_backend: Selective-scan backend (see :func:`napari_mamba_seg.models.set_scan_backend`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        k = len(DIRECTIONS)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        # Per direction, stacked along the first axis in the order of DIRECTIONS.
        self.conv1d_weight = nn.Parameter(torch.empty(k * d_inner, 1, d_conv))
        self.conv1d_bias = nn.Parameter(torch.empty(k * d_inner))
        bound = d_conv**-0.5  # nn.Conv1d's default range for a depthwise kernel
        nn.init.uniform_(self.conv1d_weight, -bound, bound)
        nn.init.uniform_(self.conv1d_bias, -bound, bound)
        params = init_direction_params(k, d_inner, self.dt_rank, d_state)
        self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias, self.A_log, self.D = map(nn.Parameter, params)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, slices: int) -> torch.Tensor:
        """Mix ``x`` ``(b, L, d_model)``, the slice-major tokens of a volume with ``slices`` slices.

        Returns:
            ``(b, L, d_model)``.
        """
        length = x.shape[1]
        if length % slices:
            raise ValueError(f"{length} tokens are not a whole number of {slices} slices")
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        xs = torch.cat([orient(x, d, slices) for d in DIRECTIONS], dim=1)  # (b, 3 * d_inner, L)
        u = F.conv1d(xs, self.conv1d_weight, self.conv1d_bias, padding=self.d_conv - 1, groups=xs.shape[1])
        u = F.silu(u[..., :length])  # causal in each direction's order
        y = scan_directions(
            u.unflatten(1, (len(DIRECTIONS), -1)),
            self.x_proj_weight,
            self.dt_proj_weight,
            self.dt_proj_bias,
            self.A_log,
            self.D,
            backend=self.scan_backend,
        )  # (b, 3 * d_inner, L)
        ys = y.unflatten(1, (len(DIRECTIONS), self.d_inner)).unbind(1)
        merged = sum(restore(yd, d, slices) for yd, d in zip(ys, DIRECTIONS, strict=True))
        # The gate is per token, so gating the sum equals gating each direction (as mamba_ssm does) before summing.
        merged = merged * F.silu(z)
        return self.out_proj(merged.transpose(1, 2))

"""The Mamba (S6) mixer of Gu & Dao 2023, on the ``napari_mamba_seg.kernels`` scan (mamba_ssm's ``Mamba`` block).

Used on flattened token sequences by the CNN-Mamba hybrids (U-Mamba, LightM-UNet, SegMamba, UltraLight VM-UNet).
Parameter names follow mamba_ssm's ``mamba_simple.Mamba`` so public checkpoints map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.kernels import selective_scan

__all__ = ["Mamba", "init_A_log", "init_direction_params", "init_dt_bias", "resolve_dt_rank", "scan_directions"]


def init_A_log(channels: int, d_state: int, copies: int = 1) -> torch.Tensor:
    """S4D-real initialisation ``A = -(1..N)`` stored as ``log(1..N)``: ``(copies * channels, d_state)``."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(copies * channels, 1)
    return torch.log(A)


def init_dt_bias(channels: int, dt_min: float = 0.001, dt_max: float = 0.1, dt_floor: float = 1e-4) -> torch.Tensor:
    """Bias whose softplus is log-uniform in ``[dt_min, dt_max]`` (mamba_ssm's dt initialisation): ``(channels,)``."""
    dt = torch.exp(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def resolve_dt_rank(d_model: int, dt_rank: int | str) -> int:
    """The dt projection rank: ``ceil(d_model / 16)`` for ``"auto"`` (mamba_ssm's default), else ``dt_rank``."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def init_direction_params(
    directions: int, d_inner: int, dt_rank: int, d_state: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial S6 parameters of ``directions`` scan orders stacked along the first axis (SS2D, tri-orientated Mamba).

    Returns:
        ``x_proj_weight`` ``(k, dt_rank + 2N, d_inner)`` (nn.Linear's default range), ``dt_proj_weight``
        ``(k, d_inner, dt_rank)``, ``dt_bias`` ``(k, d_inner)``, ``A_log`` ``(k * d_inner, N)`` and ``D``
        ``(k * d_inner,)``.
    """
    k = directions
    x_proj_weight = torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-(d_inner**-0.5), d_inner**-0.5)
    dt_proj_weight = torch.empty(k, d_inner, dt_rank).uniform_(-(dt_rank**-0.5), dt_rank**-0.5)
    dt_bias = torch.stack([init_dt_bias(d_inner) for _ in range(k)])
    return x_proj_weight, dt_proj_weight, dt_bias, init_A_log(d_inner, d_state, copies=k), torch.ones(k * d_inner)


def scan_directions(
    xs: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    backend: str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Selective scan of ``k`` sequence orders, each with its own parameters, in one grouped kernel call.

    Args:
        xs: ``(b, k, d_inner, L)``, the k orders of the same tokens.
        x_proj_weight: ``(k, dt_rank + 2N, d_inner)``.
        dt_proj_weight: ``(k, d_inner, dt_rank)``.
        dt_bias: ``(k, d_inner)``.
        A_log: ``(k * d_inner, N)``.
        D: ``(k * d_inner,)``.
        backend: Selective-scan backend.
        dtype: Cast the scan inputs to this dtype first (None: keep them as computed).

    Returns:
        ``(b, k * d_inner, L)``; B/C are grouped ``(b, k, N, L)``, one group per order.
    """
    d_state = A_log.shape[1]
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dt, B, C = torch.split(x_dbl, [dt_proj_weight.shape[-1], d_state, d_state], dim=2)
    dt = torch.einsum("bkrl,kdr->bkdl", dt, dt_proj_weight)

    def prepare(t: torch.Tensor) -> torch.Tensor:
        return (t if dtype is None else t.to(dtype)).contiguous()

    return selective_scan(
        prepare(xs.flatten(1, 2)),
        prepare(dt.flatten(1, 2)),
        -torch.exp(A_log.float()),
        prepare(B),
        prepare(C),
        D.float(),
        delta_bias=dt_bias.float().flatten(),
        delta_softplus=True,
        backend=backend,
    )


class Mamba(nn.Module):
    """Selective state-space mixer over a token sequence.

    ``in_proj`` -> causal depthwise conv1d + SiLU -> input-dependent ``(dt, B, C)`` -> selective scan gated by
    SiLU(z) -> ``out_proj``.

    Args:
        d_model: Token channels.
        d_state: SSM state size N.
        d_conv: Causal convolution width.
        expand: Inner channels = ``expand * d_model``.
        dt_rank: Rank of the dt projection; ``"auto"`` is ``ceil(d_model / 16)``.
        bias: Bias in the in/out projections.
        conv_bias: Bias in the depthwise convolution.
        scan_backend: Selective-scan backend (see :func:`napari_mamba_seg.models.set_scan_backend`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        bias: bool = False,
        conv_bias: bool = True,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner))
        self.A_log = nn.Parameter(init_A_log(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` ``(batch, L, d_model)`` along L; returns ``(batch, L, d_model)``."""
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # (b, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (b, d_inner, L), bias added in the scan
        y = selective_scan(
            x.contiguous(),
            dt.contiguous(),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))

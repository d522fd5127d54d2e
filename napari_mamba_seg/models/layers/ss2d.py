"""SS2D, the 2D selective scan of VMamba (Liu et al. 2024) as used by VM-UNet, and the VSS block around it.

The feature map is unrolled into 4 sequences (row-major, column-major, and both reversed), each scanned by its own
selective-scan parameters in one kernel call (``groups = 4``: dim = 4 x d_inner, B/C ``(b, 4, N, L)``), and the
4 outputs are folded back and summed. Parameter names follow VMamba v0 / VM-UNet so their checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models.layers.mamba import init_direction_params, resolve_dt_rank, scan_directions

__all__ = ["SS2D", "VSSBlock", "cross_merge", "cross_scan"]

_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unroll ``x`` ``(b, c, H, W)`` into the 4 scan orders: ``(b, 4, c, H*W)``.

    Order: rows (H then W), columns (W then H), rows reversed, columns reversed.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Fold the 4 scan outputs ``(b, 4, c, H*W)`` back to ``(b, c, H, W)`` and sum them (inverse of cross_scan)."""
    b, _, c, _ = y.shape
    y = y[:, :2] + y[:, 2:].flip(-1)
    rows = y[:, 0].reshape(b, c, height, width)
    cols = y[:, 1].reshape(b, c, width, height).transpose(2, 3)
    return rows + cols


class SS2D(nn.Module):
    """2D selective-scan mixer on channels-last maps.

    Args:
        d_model: Channels C of the input ``(b, H, W, C)``.
        d_state: SSM state size N.
        d_conv: Depthwise convolution kernel size.
        expand: Inner channels = ``expand * d_model``.
        dt_rank: Rank of the dt projections; ``"auto"`` is ``ceil(d_model / 16)``.
        dropout: Dropout on the output.
        scan_backend: Selective-scan backend (see :func:`napari_mamba_seg.models.set_scan_backend`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        dropout: float = 0.0,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.scan_backend = scan_backend
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        params = init_direction_params(_DIRECTIONS, d_inner, self.dt_rank, d_state)
        self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds = map(nn.Parameter, params)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` ``(b, H, W, C)``; returns ``(b, H, W, C)``."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, H, W, d_inner) each
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))  # (b, d_inner, H, W)
        y = self.scan_2d(x)  # (b, d_inner, H, W)
        y = self.out_norm(y.permute(0, 2, 3, 1))
        return self.dropout(self.out_proj(y * F.silu(z)))

    def scan_2d(self, x: torch.Tensor) -> torch.Tensor:
        """The 4-direction selective scan of ``x`` ``(b, d_inner, H, W)``; returns ``(b, d_inner, H, W)``."""
        b, d_inner, h, w = x.shape
        length = h * w
        y = scan_directions(
            cross_scan(x),  # (b, 4, d_inner, L)
            self.x_proj_weight,
            self.dt_projs_weight,
            self.dt_projs_bias,
            self.A_logs,
            self.Ds,
            backend=self.scan_backend,
            dtype=torch.float32,
        )
        return cross_merge(y.reshape(b, _DIRECTIONS, d_inner, length), h, w).to(x.dtype)


class VSSBlock(nn.Module):
    """Visual state-space block: ``x + drop_path(SS2D(LayerNorm(x)))`` on channels-last maps ``(b, H, W, C)``.

    Args:
        dim: Channels C.
        d_state: SSM state size.
        drop_path: Stochastic-depth rate.
        attn_drop_rate: Dropout inside SS2D.
        scan_backend: Selective-scan backend.
    """

    def __init__(
        self, dim: int, d_state: int = 16, drop_path: float = 0.0, attn_drop_rate: float = 0.0, scan_backend="auto"
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state=d_state, dropout=attn_drop_rate, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

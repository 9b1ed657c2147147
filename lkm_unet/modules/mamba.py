"""The Mamba-1 mixer (Gu & Dao 2023), parameter-compatible with ``mamba_ssm.modules.mamba_simple.Mamba``.

Parameter names, shapes and initialisation follow mamba-ssm so that a state_dict saved from its
``Mamba`` loads here with ``strict=True`` and gives the same output. The selective scan is
:func:`lkm_unet.ops.selective_scan` (its ``auto`` backend order: mamba-ssm's kernel, triton or the torch
scan on CUDA; numba or the torch scan on the CPU); the causal conv1d and its SiLU are
:func:`lkm_unet.ops.causal_conv1d.causal_conv1d_silu` (causal-conv1d's kernel on CUDA, numba's beside
the numba scan on the CPU, else torch's conv1d).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lkm_unet.modules.precision import run_in_fp32
from lkm_unet.ops import selective_scan
from lkm_unet.ops.causal_conv1d import causal_conv1d_silu


def _project(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` per batch item: ``(out, in)`` and ``(b, in, l)`` -> contiguous ``(b, out, l)``.

    ``torch.matmul`` would fold this into one ``(b l, in) @ (in, out)`` product and return a transposed
    view; ``bmm`` on the expanded weight writes the ``(b, out, l)`` layout itself.

    Under autocast both operands are cast before the weight is expanded: autocast would otherwise cast
    the expanded ``(b, out, in)`` view, a full copy of the weight per sequence kept for backward (with
    many short sequences, more than the activations themselves).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight, x = weight.to(dtype), x.to(dtype)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


class Mamba(nn.Module):
    """Mamba-1 block: in_proj -> causal depthwise conv -> SiLU -> selective scan (gated by z) -> out_proj.

    Input and output: ``(batch, length, d_model)``. ``out_proj=False`` builds the mixer without its
    output projection (``BiMamba`` shares one between two directions); :meth:`mix` then returns
    ``(batch, length, d_inner)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        out_proj: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory) if out_proj else None

    def _init_dt_proj(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                      dt_init_floor: float) -> None:
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init={dt_init!r}; valid: 'constant', 'random'")
        # dt log-uniform in [dt_min, dt_max]; the bias is softplus^-1(dt) so that softplus(bias) = dt.
        dt = torch.exp(torch.rand(self.d_inner, device=self.dt_proj.bias.device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden_states: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``(batch, length, d_model) -> (batch, length, d_model)``; scan and parameters in fp32."""
        if self.out_proj is None:
            raise RuntimeError("this Mamba was built with out_proj=False; call .mix() instead")
        return run_in_fp32(lambda x: self.out_proj(self.mix(x, mask)), hidden_states)

    def mix(self, hidden_states: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Everything but out_proj: ``(batch, length, d_model) -> (batch, length, d_inner)``.

        ``mask`` (batch, length), True for real tokens: padded tokens are zeroed before the conv and
        get dt = 0, so they neither feed nor decay the state (used when a feature map is padded).
        """
        # The projections run as (out, in) @ (b, in, l) products, so x, z, delta come out contiguous in the
        # scan's (b, d, l) layout instead of as transposed views that the conv and the scan copy.
        features = hidden_states.transpose(1, 2)                   # (b, d_model, l), a view
        w_x, w_z = self.in_proj.weight.chunk(2, dim=0)
        x, z = _project(w_x, features), _project(w_z, features)   # (b, d_inner, l) each
        if self.in_proj.bias is not None:
            b_x, b_z = self.in_proj.bias.chunk(2)
            x, z = x + b_x[:, None], z + b_z[:, None]
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        x = self._conv(x)
        x_dbl = _project(self.x_proj.weight, x)                    # (b, dt_rank + 2 * d_state, l)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = _project(self.dt_proj.weight, dt)                  # (b, d_inner, l); bias goes in the scan
        A = -torch.exp(self.A_log.float())
        # Under autocast (BiMamba's autocast=True) x, delta, B, C and z arrive in the autocast dtype; the
        # scan computes in fp32 from them, and no op inside it may be autocast to lower precision.
        with torch.autocast(x.device.type, enabled=False):
            if mask is None:
                y = selective_scan(x, delta, A, B, C, self.D.float(), z=z,
                                   delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            else:
                delta = F.softplus(delta.float() + self.dt_proj.bias.float()[:, None]) * mask[:, None, :]
                y = selective_scan(x, delta.to(x.dtype), A, B, C, self.D.float(), z=z)
        return y.transpose(1, 2)

    def _conv(self, x: Tensor) -> Tensor:
        return causal_conv1d_silu(x, self.conv1d.weight.squeeze(1), self.conv1d.bias)

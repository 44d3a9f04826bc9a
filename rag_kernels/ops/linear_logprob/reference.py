"""Plain-PyTorch fused-LM-head statistics: materialises the ``[N, V]`` logits.

Per row r with hidden ``h_r``, target ``y_r``:
``z_r = W h_r + bias`` (optionally ``z = c * tanh(z / c)``), ``lse_r = logsumexp_v z_rv``,
``lp_r = z_r[y_r] - lse_r``, ``S_r = sum_v log p_rv = sum_v z_rv - V * lse_r``.
Rows whose target equals ``ignore_index`` return 0 for all three and get no gradient.
The logits are formed in the input dtype (what plain PyTorch does) and reduced in fp32
(fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch


def logits_reference(hidden, weight, bias=None, softcap=None):
    """``[N, V]`` logits in fp32 (fp64 for fp64 inputs), softcap applied."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.double() if z.dtype == torch.float64 else z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprob_reference(hidden, weight, target, bias=None, ignore_index=-100, softcap=None):
    """Returns ``(lp, lse, sum_logprob)``, each ``[N]``; ``hidden [N,H]``, ``weight [V,H]``."""
    keep = target != ignore_index
    # Zero ignored rows first: whatever they hold (NaN included) must not reach dW.
    hidden = torch.where(
        keep[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    )
    z = logits_reference(hidden, weight, bias, softcap)
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(1, safe_target[:, None].long())[:, 0] - lse
    sum_lp = z.sum(dim=-1) - z.shape[-1] * lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return (
        torch.where(keep, lp, zero),
        torch.where(keep, lse, zero),
        torch.where(keep, sum_lp, zero),
    )

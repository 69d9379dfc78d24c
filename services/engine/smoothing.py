"""SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): move activation outliers into the weights before int8.

A linear y = X W^T equals (X / s) (W diag(s))^T for any per-input-channel s > 0. With
    s_c = max|X_c|^alpha / max|W_c|^(1 - alpha)
the outlier channels of X shrink and the matching weight columns grow, so per-token int8 rounding
spends its 8 bits on every channel instead of a few. X / s is folded into whatever produced X, so the
smoothed float32 model computes the same function and costs nothing at run time:
    qkv_proj      <- input_layernorm.weight       (the norm's weight multiplies its output)
    gate_up_proj  <- post_attention_layernorm.weight
    down_proj     <- rows of the `up` half of gate_up_proj   (input = silu(gate) * up)
    o_proj        <- rows of the `v` part of qkv_proj        (attention output is a mix of v rows)
The LM head is left unsmoothed: folding into model.norm would change the final hidden states the model
returns, which feature drafters (EAGLE) read. It costs ~2 points of top-1 agreement on SmolLM2-135M.
Scaling a weight's output rows (v, up) is free for int8: its scale is per output row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from specserve.engine.config import CacheConfig
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import allocate_kv_cache
from specserve.kernels.paged_attention import build_attention_metadata

# SmoothQuant's default; on SmolLM2-135M alpha 0.5-0.8 were measured (see `apply_weight_dtype`).
DEFAULT_ALPHA = 0.5
# Floors for the maxima: a channel silent in calibration must not get an enormous 1 / s.
_FLOOR = 1e-5


def calibration_text() -> str:
    """A few hundred tokens of generic English, Q&A and code bundled with the package (no benchmark data)."""
    return (Path(__file__).parent / "calibration.txt").read_text(encoding="utf-8")


@torch.inference_mode()
def collect_input_absmax(model: LlamaModel, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """max |x| per input channel `# [in]` of every nn.Linear, by module name, over one prefill of `token_ids`."""
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(linear: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            absmax[name] = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)  # [in]

        return record

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in linears]
    try:
        n = len(token_ids)
        cache = CacheConfig(block_size=16, num_blocks=-(-n // 16))
        meta = build_attention_metadata([n], [n], [list(range(cache.num_blocks))], cache.block_size)
        kv = allocate_kv_cache(model.config, cache, torch.float32)
        # Every row goes through the head too, so its statistics cover the whole text.
        model(torch.tensor(token_ids), torch.arange(n), kv, meta, torch.arange(n))
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X_c|^alpha / max|W_c|^(1-alpha), per input channel c (any shape, elementwise)."""
    return act_absmax.clamp_min(_FLOOR).pow(alpha) / weight_absmax.clamp_min(_FLOOR).pow(1 - alpha)


@torch.no_grad()
def smooth_(model: LlamaModel, absmax: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA) -> None:
    """Fold SmoothQuant scales into `model`'s float32 weights in place; its function is unchanged.

    `absmax` is `collect_input_absmax` of this model (or of an identical copy: keys are module names).
    """
    cfg = model.config
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        # Row scalings first: they change the qkv / gate_up weights whose column maxima come next.
        _smooth_o_proj(attn, absmax[p + "self_attn.o_proj"], alpha, cfg.num_heads // cfg.num_kv_heads)
        inter = mlp.down_proj.in_features
        s = smoothing_scale(absmax[p + "mlp.down_proj"], mlp.down_proj.weight.abs().amax(dim=0), alpha)  # [inter]
        mlp.gate_up_proj.weight[inter:].div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        _fold_into_norm(layer.input_layernorm, attn.qkv_proj, absmax[p + "self_attn.qkv_proj"], alpha)
        _fold_into_norm(layer.post_attention_layernorm, mlp.gate_up_proj, absmax[p + "mlp.gate_up_proj"], alpha)


def _fold_into_norm(norm: nn.Module, linear: nn.Linear, act_absmax: torch.Tensor, alpha: float) -> None:
    s = smoothing_scale(act_absmax, linear.weight.abs().amax(dim=0), alpha)  # [hidden]
    norm.weight.div_(s)
    linear.weight.mul_(s)


def _smooth_o_proj(attn: nn.Module, act_absmax: torch.Tensor, alpha: float, group: int) -> None:
    """o_proj's input channel (h, d) is v channel (h // group, d): q heads sharing a kv head share s."""
    d, kv_heads = attn.head_dim, attn.num_kv_heads
    act = act_absmax.view(kv_heads, group, d).amax(dim=1)  # [Hkv, D]
    weight = attn.o_proj.weight.view(-1, kv_heads, group, d).abs().amax(dim=(0, 2))  # [Hkv, D]
    s = smoothing_scale(act, weight, alpha)  # [Hkv, D]
    v_rows = attn.qkv_proj.weight[(attn.num_heads + kv_heads) * d :]  # [Hkv * D, hidden]
    v_rows.div_(s.reshape(-1, 1))
    attn.o_proj.weight.mul_(s[:, None, :].expand(kv_heads, group, d).reshape(1, -1))

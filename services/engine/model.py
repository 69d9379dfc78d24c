"""A plain Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over a ragged batch and a paged KV cache.

Knows nothing about scheduling or quantization: the model runner hands it flat tensors and attention
metadata; weight precision is applied from outside by swapping `nn.Linear` modules (engine/quant.py).
Q/K/V and gate/up projections are fused into one matmul each, which matters at batch 1 on a CPU; Q/K
rows are stored with RoPE channel pairs adjacent so the rotation is one complex multiply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specserve.engine.config import ModelConfig
from specserve.errors import ModelLoadError
from specserve.kernels import cpu_ops
from specserve.kernels.paged_attention import CPU_KV_DTYPES, AttentionMetadata, paged_attention, write_kv

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each [num_slots, num_kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_ops.applies(x, self.weight):  # one fused C++ call instead of ~6 torch ops
            return torch.ops.specserve_cpu.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies `# [head_dim / 2]`, with the checkpoint's scaling rule applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(middle, blended, scaled)
    raise ModelLoadError(f"unsupported rope scaling type {rope_type!r}")


class Rotary(nn.Module):
    """RoPE as a complex multiply; the rotation for every position of the context is computed once.

    HF checkpoints pair channel i with i + head_dim/2 (rotate-half); `interleave_rope_rows` reorders the
    Q/K weight rows at load so pairs are adjacent, which lets one complex multiply rotate them. Q and K
    get the same channel order, so their dot products, and the attention output, are unchanged.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float64)
        angles = torch.outer(positions, rope_inv_freq(config))  # [max_pos, head_dim / 2]
        self.register_buffer("rotations", torch.polar(torch.ones_like(angles), angles).to(torch.complex64),
                             persistent=False)

    def tables(self, positions: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations for the batch `# [num_tokens, 1, head_dim / 2]`, looked up once a forward."""
        return self.rotations[positions].unsqueeze(1)


def interleave_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to (x_0, y_0, x_1, y_1, ...)."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.view(num_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x `# [num_tokens, heads, head_dim]` (adjacent channel pairs) rotated by position."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [num_tokens, heads, head_dim / 2]
    return torch.view_as_real(pairs * rotations).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        # What long prefill chunks' SDPA computes in (kernels/paged_attention.py, `_attend_group`); None: float32.
        # engine/quant.py sets bfloat16 for bfloat16 and int8 weights.
        self.sdpa_dtype: torch.dtype | None = None

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        rope: torch.Tensor,  # [num_tokens, 1, head_dim / 2] complex64
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        qkv = self.qkv_proj(x)  # [num_tokens, (H + 2 Hkv) * D]
        if cpu_ops.applies(qkv) and kv_cache[0].dtype in CPU_KV_DTYPES:  # one fused C++ call for the lines below
            q = torch.ops.specserve_cpu.rope_write_kv(qkv.contiguous(), torch.view_as_real(rope), *kv_cache, meta.slot_mapping,
                                                      self.num_heads, self.num_kv_heads)
        else:
            qkv = qkv.view(x.shape[0], -1, self.head_dim)  # [num_tokens, H + 2 Hkv, D]
            # Q and K heads are adjacent, so one rotation covers both.
            qk = apply_rope(qkv[:, : self.num_heads + self.num_kv_heads], rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = qkv[:, self.num_heads + self.num_kv_heads :]
            write_kv(*kv_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, *kv_cache, meta, self.scale, self.sdpa_dtype)  # [num_tokens, H, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


def _layer_operands(layers: nn.ModuleList) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(norm weights, linear operands) of every layer for the fused C++ call, or None when a linear cannot
    run there or the linears of the model are not all of one kind (float32, int8 or oneDNN bfloat16)."""
    norms: list[torch.Tensor] = []
    linears: list[list[torch.Tensor]] = []
    for layer in layers:
        norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            operands = getattr(module, "fused_operands", lambda: None)()
            if operands is None:
                return None
            linears.append(operands)
    if len({(len(ops), ops[0].dtype) for ops in linears}) != 1:
        return None
    return norms, [t for ops in linears for t in ops]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Steps whose every row the CPU attention kernel takes run all decoder layers in one C++ call
        # (`_fused_operands`); False forces the per-layer modules (profiling hooks, tests comparing the two).
        self.fuse_layers = True
        self._fused: tuple[tuple[nn.Module, ...], tuple[list[torch.Tensor], list[torch.Tensor]] | None] | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64, flat ragged batch
        positions: torch.Tensor,  # [num_tokens] int64, position of each token in its sequence
        kv_caches: KVCache,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_selected] int64, rows whose logits are wanted
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits `# [num_selected, vocab]` and, if asked, the final-norm hidden state of every row
        `# [num_tokens, hidden]` (feature drafters such as EAGLE keep them all, prefill rows included).

        Runs as many layers as `kv_caches` holds, from the first: given the caches of the first L layers
        only, it is the early exit after layer L (drafters/early_exit.py drafts that way).
        """
        assert input_ids.shape == positions.shape and input_ids.dim() == 1
        assert 1 <= len(kv_caches) <= len(self.layers)
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions)
        operands = self._fused_operands(x, kv_caches, meta)
        if operands is not None:
            x = self._fused_layers(x, rope, kv_caches, meta, *operands)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(x, rope, kv_cache, meta)
        if return_hidden:
            hidden = self.norm(x)  # row-wise: a selected row's value equals normalising it alone
            return self.lm_head(hidden[logits_indices]).float(), hidden
        return self.lm_head(self.norm(x[logits_indices])).float(), None

    def _fused_operands(
        self, x: torch.Tensor, kv_caches: KVCache, meta: AttentionMetadata
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Every layer's two norm weights and its four linears' operands, in layer order, for
        `specserve_cpu::decoder_layers` (kernels/csrc/decoder_cpu.cpp: the same kernel calls as the layer
        modules, in one C++ call, the same bits); None where that call does not apply: the C++ kernels are
        not loaded, gradients are wanted, some rows go to SDPA (a long prefill chunk) or another attention
        backend, the cache is neither float32 nor bfloat16, or a linear has no `fused_operands` (int8 on
        fbgemm or float32 GEMMs, bfloat16 on F.linear, a bias). The operands are gathered once and kept
        while the layers hold the same linear modules.
        """
        if not (self.fuse_layers and meta.cpu_args is not None and not meta.groups and cpu_ops.applies(x)
                and kv_caches[0][0].dtype in CPU_KV_DTYPES):
            return None
        first, last = self.layers[0], self.layers[-1]
        key = (first.self_attn.qkv_proj, first.mlp.down_proj, last.self_attn.qkv_proj, last.mlp.down_proj)
        if self._fused is None or any(a is not b for a, b in zip(self._fused[0], key)):
            self._fused = (key, _layer_operands(self.layers))
        return self._fused[1]

    def _fused_layers(
        self, x: torch.Tensor, rope: torch.Tensor, kv_caches: KVCache, meta: AttentionMetadata,
        norms: list[torch.Tensor], linears: list[torch.Tensor],
    ) -> torch.Tensor:  # [num_tokens, hidden], the residual stream after the layers of `kv_caches`
        layers, args, attn = len(kv_caches), meta.cpu_args, self.layers[0].self_attn
        per_layer = len(linears) // len(self.layers)
        return torch.ops.specserve_cpu.decoder_layers(
            x, torch.view_as_real(rope), [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
            args.block_tables, args.prefix_lens, args.row_starts, args.query_lens, args.tree_mask, args.block_size,
            attn.scale, norms[: 2 * layers], linears[: per_layer * layers], attn.num_heads, attn.num_kv_heads,
            self.config.rms_norm_eps,
        )

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load HF Llama names, fusing q/k/v and gate/up into the model's combined projections."""
        fused: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            fused[p + "self_attn.qkv_proj.weight"] = torch.cat([
                interleave_rope_rows(state_dict[p + "self_attn.q_proj.weight"], self.config.num_heads),
                interleave_rope_rows(state_dict[p + "self_attn.k_proj.weight"], self.config.num_kv_heads),
                state_dict[p + "self_attn.v_proj.weight"],
            ])
            fused[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [state_dict[p + "mlp.gate_proj.weight"], state_dict[p + "mlp.up_proj.weight"]]
            )
            for name in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
                fused[p + name + ".weight"] = state_dict[p + name + ".weight"]
        fused["embed_tokens.weight"] = state_dict["model.embed_tokens.weight"]
        fused["norm.weight"] = state_dict["model.norm.weight"]
        if not self.config.tie_word_embeddings:
            fused["lm_head.weight"] = state_dict["lm_head.weight"]
        own = {k.removeprefix("model."): v for k, v in fused.items()}
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")

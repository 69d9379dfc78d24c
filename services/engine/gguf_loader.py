"""Read a llama.cpp GGUF file into a `ModelConfig` and a float32 state dict with Hugging Face Llama names.

Quantized tensors are dequantized with `gguf.quants` (vectorized numpy over the memory-mapped file), and the
Q/K rows llama.cpp's converter permuted for its interleaved RoPE are put back in HF's rotate-half order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from specserve.engine.config import ModelConfig
from specserve.engine.gguf_file import GGUFHeader, TensorInfo, read_header, tensor_data
from specserve.errors import ModelLoadError

SUPPORTED_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
    }
)

# GGUF tensor name -> HF name; per-layer names are the part after "blk.{i}.".
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Parse `path`; raises ModelLoadError for content we do not support (`load_checkpoint` wraps parse errors)."""
    header = read_header(path)
    config = _llama_config(header)
    data = tensor_data(path, header.tensors)
    state_dict = {}
    for tensor in header.tensors:
        weights = _dequantize(path, tensor, data[tensor.name])
        name = _hf_name(path, tensor.name)
        if name.endswith("q_proj.weight"):
            weights = unpermute_rope_rows(weights, config.num_heads)
        elif name.endswith("k_proj.weight"):
            weights = unpermute_rope_rows(weights, config.num_kv_heads)
        state_dict[name] = torch.from_numpy(weights)
    return config, state_dict


def load_gguf_config(path: Path) -> ModelConfig:
    """The config alone: the GGUF header is parsed, no tensor is read."""
    return _llama_config(read_header(path))


def load_gguf_embedding(path: Path) -> torch.Tensor:
    """The token embedding table alone `# [vocab, hidden]` float32, as `load_gguf` dequantizes it."""
    header = read_header(path)
    _llama_config(header)
    embedding = [t for t in header.tensors if t.name == "token_embd.weight"]
    if not embedding:
        raise ModelLoadError(f"{path}: no token_embd.weight")
    return torch.from_numpy(_dequantize(path, embedding[0], tensor_data(path, embedding)["token_embd.weight"]))


def _dequantize(path: Path, tensor: TensorInfo, data: np.ndarray) -> np.ndarray:
    """`data` (as `tensor_data` maps it) as a writable float32 array."""
    if tensor.type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelLoadError(f"{path}: tensor {tensor.name} has type {tensor.type.name}; supported: {supported}")
    weights = dequantize(data, tensor.type)
    if not weights.flags.writeable:  # F32 tensors come back as views of the read-only memmap
        weights = weights.copy()
    return weights


def _llama_config(header: GGUFHeader) -> ModelConfig:
    arch = _required(header, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{header.path}: architecture {arch!r} is not supported (only 'llama')")
    return _config(header)


def unpermute_rope_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of a Q or K projection ([num_heads * head_dim, hidden]).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... while HF rotates halves (x_i, x_{i + d/2}), so
    its converter reorders each head's rows as [0, d/2, 1, d/2 + 1, ...]; this restores [0, 1, ..., d-1].
    E.g. one head, head_dim 4: GGUF rows [r0, r2, r1, r3] -> [r0, r1, r2, r3].
    """
    half_dim = weights.shape[0] // num_heads // 2
    pairs = weights.reshape(num_heads, half_dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(weights.shape)


def _hf_name(path: Path, gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[base]}.weight"
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise ModelLoadError(f"{path}: unexpected tensor {gguf_name} for a llama model")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"


def _config(header: GGUFHeader) -> ModelConfig:
    path = header.path
    hidden_size = int(_required(header, "llama.embedding_length"))
    num_heads = int(_required(header, "llama.attention.head_count"))
    head_dim = int(_optional(header, "llama.attention.key_length", hidden_size // num_heads))
    rope_dims = int(_optional(header, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelLoadError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab_size = _optional(header, "llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ModelLoadError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    bos = _optional(header, "tokenizer.ggml.bos_token_id", None)
    eos = _optional(header, "tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(_required(header, "llama.feed_forward_length")),
        num_layers=int(_required(header, "llama.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_optional(header, "llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(_required(header, "llama.context_length")),
        rms_norm_eps=float(_required(header, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_optional(header, "llama.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(header),
        tie_word_embeddings=all(t.name != "output.weight" for t in header.tensors),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _rope_scaling(header: GGUFHeader) -> tuple[tuple[str, object], ...]:
    """llama.rope.scaling.* as HF's `rope_scaling` dict, flattened and sorted; () when unscaled."""
    kind = _optional(header, "llama.rope.scaling.type", "none")
    if kind == "none":
        return ()
    scaling: dict[str, object] = {"rope_type": kind}
    factor = _optional(header, "llama.rope.scaling.factor", None)
    if factor is not None:
        scaling["factor"] = float(factor)
    original = _optional(header, "llama.rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return tuple(sorted(scaling.items()))


def _required(header: GGUFHeader, key: str) -> object:
    if key not in header.metadata:
        raise ModelLoadError(f"{header.path}: metadata key {key} is missing")
    return header.metadata[key]


def _optional(header: GGUFHeader, key: str, default: object) -> object:
    return header.metadata.get(key, default)

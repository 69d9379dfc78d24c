"""Load a Llama checkpoint, a GGUF file or a safetensors directory, as (ModelConfig, float32 state dict).

The state dict uses HF LlamaForCausalLM names whatever the format; this module checks it is complete and
shaped as the config says, and turns any failure to parse a corrupt file into a one-line ModelLoadError.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from specserve.engine.config import ModelConfig
from specserve.engine.gguf_loader import load_gguf, load_gguf_config, load_gguf_embedding
from specserve.engine.safetensors_loader import (
    load_safetensors_config,
    load_safetensors_dir,
    load_safetensors_embedding,
)
from specserve.errors import ModelLoadError

T = TypeVar("T")


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A `*.gguf` file or a directory holding config.json and model*.safetensors."""
    path = Path(path)
    config, state_dict = _read(path, load_safetensors_dir, load_gguf)
    check_state_dict(path, config, state_dict)
    return config, state_dict


def load_config(path: str | Path) -> ModelConfig:
    """The config of the checkpoint `load_checkpoint(path)` would load, read without its weights (the GGUF
    header, config.json): enough for checks that should fail before a load of many seconds."""
    return _read(Path(path), load_safetensors_config, load_gguf_config)


def load_embedding(path: str | Path) -> torch.Tensor:
    """The token embedding table `# [vocab, hidden]` float32 of the checkpoint, the rest unread (what a
    process that needs the target's fingerprint, not its weights, reads: learned/checkpoint.py)."""
    return _read(Path(path), load_safetensors_embedding, load_gguf_embedding)


def _read(path: Path, read_dir: Callable[[Path], T], read_gguf: Callable[[Path], T]) -> T:
    """`read_dir(path)` for a directory, `read_gguf(path)` for a .gguf file; any failure a ModelLoadError."""
    if path.is_dir():
        read = read_dir
    elif path.is_file() and path.suffix == ".gguf":
        read = read_gguf
    elif not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    else:
        raise ModelLoadError(f"{path}: expected a .gguf file or a directory with config.json and safetensors")
    try:
        return read(path)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt files fail deep inside gguf, numpy, safetensors or json in many ways
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise ModelLoadError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {detail})") from exc


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama of this config needs, by HF name."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
            f"{prefix}.mlp.up_proj.weight": (inter, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def check_state_dict(path: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ModelLoadError unless `state_dict` holds exactly the tensors `config` implies, in float32."""
    biases = sorted(name for name in state_dict if name.endswith(".bias"))
    if biases:
        raise ModelLoadError(f"{path}: attention/MLP biases are not supported (found {biases[0]})")
    shapes = expected_shapes(config)
    missing = sorted(shapes.keys() - state_dict.keys())
    if missing:
        raise ModelLoadError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(state_dict.keys() - shapes.keys())
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensor {unexpected[0]} for a Llama checkpoint")
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            found = tuple(state_dict[name].shape)
            raise ModelLoadError(f"{path}: tensor {name} has shape {found}, the config implies {shape}")
    assert all(t.dtype == torch.float32 for t in state_dict.values()), "format loaders must upcast to float32"

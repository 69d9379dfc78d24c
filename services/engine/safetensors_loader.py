"""Read a Hugging Face Llama checkpoint directory (config.json + one or sharded *.safetensors) into a
`ModelConfig` and a float32 state dict; HF names are already the engine's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from specserve.engine.config import ModelConfig
from specserve.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
EMBEDDING = "model.embed_tokens.weight"
SHARD_INDEX = "model.safetensors.index.json"


def load_safetensors_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Parse the directory `path`; raises ModelLoadError for missing files or content we do not support."""
    config = config_from_hf(path, _read_json(path / "config.json"))
    state_dict = {}
    for shard in _shard_files(path):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                # Older transformers saved the RoPE buffer; the engine recomputes it from rope_theta.
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                state_dict[name] = tensors.get_tensor(name).to(torch.float32)
    if config.tie_word_embeddings:
        # Some tied checkpoints still store a copy of the embedding as lm_head.
        state_dict.pop("lm_head.weight", None)
    return config, state_dict


def load_safetensors_embedding(path: Path) -> torch.Tensor:
    """The token embedding table alone `# [vocab, hidden]` float32 (one tensor read from its shard)."""
    config_from_hf(path, _read_json(path / "config.json"))
    for shard in _shard_files(path):
        with safe_open(shard, framework="pt") as tensors:
            if EMBEDDING in tensors.keys():
                return tensors.get_tensor(EMBEDDING).to(torch.float32)
    raise ModelLoadError(f"{path}: no {EMBEDDING}")


def load_safetensors_config(path: Path) -> ModelConfig:
    """The config alone, from config.json (no shard is opened)."""
    return config_from_hf(path, _read_json(path / "config.json"))


def config_from_hf(path: Path, hf: dict) -> ModelConfig:
    """Map HF `LlamaConfig` fields (transformers 4 or 5 layout) to ModelConfig."""
    if hf.get("model_type") != "llama":
        raise ModelLoadError(f"{path}: model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ModelLoadError(f"{path}: Llama variants with attention_bias/mlp_bias are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ModelLoadError(f"{path}: config.json lacks {', '.join(missing)}")
    num_heads = hf["num_attention_heads"]
    # transformers 5 folds rope_theta into `rope_parameters`; 4 keeps `rope_theta` and `rope_scaling` apart.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        # Defaults are LlamaConfig's, for configs that omit a field.
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling(rope),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,),
    )


def _rope_scaling(rope: dict) -> tuple[tuple[str, object], ...]:
    """HF rope scaling dict (without rope_theta) -> sorted hashable pairs; () for plain RoPE."""
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return ()
    rope["rope_type"] = kind
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))


def _shard_files(path: Path) -> list[Path]:
    if (path / SHARD_INDEX).is_file():
        weight_map = _read_json(path / SHARD_INDEX).get("weight_map", {})
        shards = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / SINGLE_FILE).is_file():
        shards = [path / SINGLE_FILE]
    else:
        raise ModelLoadError(f"{path}: neither {SINGLE_FILE} nor {SHARD_INDEX} is present")
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"{path}: shard {shard.name} listed in {SHARD_INDEX} is missing")
    return shards


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ModelLoadError(f"{file}: not found")
    return json.loads(file.read_text())

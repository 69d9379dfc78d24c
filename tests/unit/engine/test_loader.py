"""Checkpoint loaders: GGUF files and safetensors directories both give HF Llama names and float32 tensors
equal to what transformers loads, and every bad input is a one-line ModelLoadError naming the path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specserve.engine.config import ModelConfig
from specserve.engine.gguf_loader import unpermute_rope_rows
from specserve.engine.gguf_file import read_header, tensor_data
from specserve.engine.loader import load_checkpoint, load_config, load_embedding
from specserve.engine.safetensors_loader import config_from_hf
from specserve.errors import ModelLoadError

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_CONFIG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
    bos_token_id=1,
    eos_token_ids=(2,),
)
LoadedCheckpoint = tuple[ModelConfig, dict[str, torch.Tensor]]
# HF -> GGUF names as llama.cpp's convert_hf_to_gguf.py writes them.
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Worst error of each storage type relative to the tensor's largest |value|: Q4_1 rounds to 1/30 of a block's
# range, Q4_0 clips the side opposite the block's extreme at 7/8 of it, so errs by up to 1/8.
RELATIVE_TOLERANCE = {
    QType.F32: 0.0,
    QType.F16: 1e-3,
    QType.BF16: 4e-3,
    QType.Q8_0: 5e-3,
    QType.Q4_0: 0.13,
    QType.Q4_1: 0.07,
}


def tiny_llama(tie: bool, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(TINY | overrides), tie_word_embeddings=tie)).eval()


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows -> llama.cpp interleaved rows."""
    half_dim = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, 2, half_dim, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight").removesuffix(".bias")
    suffix = hf_name[len(base) :]
    if base in GGUF_GLOBAL:
        return GGUF_GLOBAL[base] + suffix
    layer, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base).groups()
    return f"blk.{layer}.{GGUF_LAYER[kind]}{suffix}"


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    qtype: QType = QType.F32,
    arch: str = "llama",
    rope_scaling: bool = False,
    raw_tensors: dict[str, tuple[np.ndarray, QType]] | None = None,
) -> Path:
    """Write `model` as llama.cpp would: permuted Q/K rows, norms in F32, linears in `qtype`; then `raw_tensors`
    (GGUF name -> already-encoded bytes and their type)."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_rope_scaling_orig_ctx_len(128)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights = tensor.numpy()
        if "q_proj.weight" in name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif "k_proj.weight" in name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        tensor_type = qtype if weights.ndim == 2 else QType.F32
        writer.add_tensor(gguf_name(name), gguf.quants.quantize(weights, tensor_type), raw_dtype=tensor_type)
    for name, (data, tensor_type) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as excinfo:
        load_checkpoint(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    return message


# --- GGUF: the real model against transformers' own GGUF loader -------------------------------------------


@pytest.fixture(scope="module")
def gguf_path(model_path: Path) -> Path:
    return model_path


@pytest.fixture(scope="module")
def smollm(gguf_path: Path) -> LoadedCheckpoint:
    return load_checkpoint(gguf_path)


@pytest.fixture(scope="module")
def smollm_reference(hf_model: LlamaForCausalLM) -> LlamaForCausalLM:
    return hf_model


def test_gguf_state_dict_matches_transformers(
    smollm: LoadedCheckpoint, smollm_reference: LlamaForCausalLM
) -> None:
    config, state_dict = smollm
    expected = smollm_reference.state_dict()
    assert config.tie_word_embeddings
    expected.pop("lm_head.weight")  # tied: transformers aliases embed_tokens, we leave it out
    assert state_dict.keys() == expected.keys()
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32
        assert (tensor - expected[name]).abs().max() <= 1e-6, name  # allclose, but 10x faster on CPU


def test_gguf_config_matches_transformers(
    smollm: LoadedCheckpoint, smollm_reference: LlamaForCausalLM
) -> None:
    config, reference = smollm[0], smollm_reference.config
    assert config.vocab_size == reference.vocab_size == 49152
    assert config.hidden_size == reference.hidden_size
    assert config.intermediate_size == reference.intermediate_size
    assert config.num_layers == reference.num_hidden_layers == 30
    assert config.num_heads == reference.num_attention_heads
    assert config.num_kv_heads == reference.num_key_value_heads
    assert config.head_dim == reference.head_dim
    assert config.max_position_embeddings == reference.max_position_embeddings
    assert config.rms_norm_eps == reference.rms_norm_eps
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 100000.0
    assert config.rope_scaling == ()
    assert config.tie_word_embeddings == reference.tie_word_embeddings
    assert config.bos_token_id == reference.bos_token_id
    assert config.eos_token_ids == (reference.eos_token_id,)


def test_config_alone_equals_the_loaded_one(smollm: LoadedCheckpoint, gguf_path: Path, tmp_path: Path) -> None:
    """`load_config` reads the header only (drafter settings are checked with it before the load)."""
    assert load_config(gguf_path) == smollm[0]
    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path)
    assert load_config(tmp_path) == load_checkpoint(tmp_path)[0] == replace(TINY_CONFIG, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text("{not json")
    assert "corrupt or truncated" in str(pytest.raises(ModelLoadError, load_config, tmp_path).value)
    assert "no such file" in str(pytest.raises(ModelLoadError, load_config, tmp_path / "absent.gguf").value)


def test_header_reader_equals_gguf_readers(gguf_path: Path) -> None:
    """gguf_file.py reads what gguf.GGUFReader reads (every metadata value, every tensor's type, offset,
    shape and bytes), ~30x faster on the real vocabulary."""
    reader, header = gguf.GGUFReader(gguf_path), read_header(gguf_path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert header.metadata == fields and len(fields["tokenizer.ggml.tokens"]) == 49152
    data = tensor_data(gguf_path, header.tensors)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for info, tensor in zip(header.tensors, reader.tensors):
        assert (info.type, info.data_offset) == (tensor.tensor_type, tensor.data_offset)
        assert data[info.name].dtype == tensor.data.dtype and np.array_equal(data[info.name], tensor.data), info.name


def test_embedding_alone_equals_the_loaded_one(smollm: LoadedCheckpoint, gguf_path: Path, tmp_path: Path) -> None:
    assert torch.equal(load_embedding(gguf_path), smollm[1]["model.embed_tokens.weight"])
    tiny_llama(tie=True).save_pretrained(tmp_path, max_shard_size="20KB")
    assert torch.equal(load_embedding(tmp_path), load_checkpoint(tmp_path)[1]["model.embed_tokens.weight"])


def test_truncated_real_gguf(gguf_path: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with gguf_path.open("rb") as whole:
        truncated.write_bytes(whole.read(1 << 20))
    load_error(truncated)


# --- GGUF: tiny files written like llama.cpp's converter -----------------------------------------------


def test_unpermute_rope_rows_worked_example() -> None:
    rows = np.arange(4, dtype=np.float32)[:, None]  # one head, head_dim 4
    gguf_rows = llama_cpp_permute(rows, num_heads=1)
    assert gguf_rows.ravel().tolist() == [0, 2, 1, 3]
    assert unpermute_rope_rows(gguf_rows, num_heads=1).ravel().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("num_heads", [1, 3])
def test_unpermute_rope_rows_inverts_llama_cpp(num_heads: int) -> None:
    weights = np.random.default_rng(0).standard_normal((num_heads * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(weights, num_heads), num_heads), weights)


@pytest.mark.parametrize("qtype", list(RELATIVE_TOLERANCE), ids=lambda q: q.name)
def test_gguf_tensor_types_round_trip(qtype: QType, tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    config, state_dict = load_checkpoint(write_gguf(tmp_path / "tiny.gguf", model, qtype))
    assert config == replace(TINY_CONFIG, rms_norm_eps=float(np.float32(1e-6)))  # GGUF stores float32
    expected = model.state_dict()
    assert state_dict.keys() == expected.keys()
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32
        error = (tensor - expected[name]).abs().max()
        assert error <= RELATIVE_TOLERANCE[qtype] * expected[name].abs().max(), name


def test_gguf_without_output_weight_is_tied(tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    config, state_dict = load_checkpoint(write_gguf(tmp_path / "tied.gguf", model))
    assert config.tie_word_embeddings
    assert "lm_head.weight" not in state_dict
    embeddings = model.state_dict()["model.embed_tokens.weight"]
    torch.testing.assert_close(state_dict["model.embed_tokens.weight"], embeddings, rtol=0, atol=0)


def test_gguf_rope_scaling(tmp_path: Path) -> None:
    config, _ = load_checkpoint(write_gguf(tmp_path / "scaled.gguf", tiny_llama(tie=False), rope_scaling=True))
    expected = {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 128}
    assert config.rope_scaling_dict == expected


def test_gguf_other_architecture(tmp_path: Path) -> None:
    assert "'qwen2'" in load_error(write_gguf(tmp_path / "qwen.gguf", tiny_llama(tie=False), arch="qwen2"))


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    q4_k_block = np.zeros((1, 144), np.uint8)  # one row of 256 weights in 144 bytes
    raw_tensors = {"extra.weight": (q4_k_block, QType.Q4_K)}
    path = write_gguf(tmp_path / "q4k.gguf", tiny_llama(tie=False), raw_tensors=raw_tensors)
    assert "Q4_K" in load_error(path)


def test_gguf_attention_bias(tmp_path: Path) -> None:
    model = tiny_llama(tie=False, attention_bias=True)
    assert "bias" in load_error(write_gguf(tmp_path / "bias.gguf", model))


def test_gguf_truncated_tensor_data(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=False))
    path.write_bytes(path.read_bytes()[:-1000])
    load_error(path)


def test_random_bytes_gguf(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    load_error(path)


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in load_error(tmp_path / "absent.gguf")


# --- safetensors directories ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", ["single", "sharded", "bfloat16"])
def test_safetensors_matches_transformers(layout: str, tie: bool, tmp_path: Path) -> None:
    model = tiny_llama(tie)
    if layout == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "1GB")
    if layout == "sharded":
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
    config, state_dict = load_checkpoint(tmp_path)
    assert config == replace(TINY_CONFIG, tie_word_embeddings=tie)
    expected = {name: tensor.float() for name, tensor in model.state_dict().items()}
    if tie:
        expected.pop("lm_head.weight")
    assert state_dict.keys() == expected.keys()
    for name, tensor in state_dict.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_config_from_transformers_4_layout() -> None:
    hf = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "eos_token_id": [128001, 128009],
    }
    config = config_from_hf(Path("llama"), hf)
    assert config.head_dim == 128
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == (("factor", 4.0), ("rope_type", "linear"))
    assert config.eos_token_ids == (128001, 128009)
    assert not config.tie_word_embeddings


def saved_tiny(path: Path, **overrides: object) -> Path:
    tiny_llama(tie=False, **overrides).save_pretrained(path)
    return path


def edit_config(path: Path, **fields: object) -> Path:
    config_file = path / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | fields))
    return path


def test_directory_without_config(tmp_path: Path) -> None:
    assert "config.json" in load_error(tmp_path)


def test_directory_without_weights(tmp_path: Path) -> None:
    (saved_tiny(tmp_path) / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(tmp_path)


def test_unsupported_model_type(tmp_path: Path) -> None:
    assert "'mistral'" in load_error(edit_config(saved_tiny(tmp_path), model_type="mistral"))


def test_llama_with_attention_bias(tmp_path: Path) -> None:
    assert "attention_bias" in load_error(saved_tiny(tmp_path, attention_bias=True))


def test_missing_tensor(tmp_path: Path) -> None:
    _, state_dict = load_checkpoint(saved_tiny(tmp_path))
    del state_dict["model.layers.1.mlp.up_proj.weight"]
    save_file(state_dict, tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in load_error(tmp_path)


def test_shape_mismatch(tmp_path: Path) -> None:
    assert "shape" in load_error(edit_config(saved_tiny(tmp_path), intermediate_size=96))


def test_missing_shard(tmp_path: Path) -> None:
    tiny_llama(tie=False).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    assert shard.name in load_error(tmp_path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    (saved_tiny(tmp_path) / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    load_error(tmp_path)

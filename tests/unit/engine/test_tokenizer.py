"""The tokenizer built from GGUF metadata, checked token-for-token against transformers on the same file.

transformers is a test-only reference here; a tiny GGUF written by `tiny_gguf` covers the error paths.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import pre_tokenizers

from specserve.engine.tokenizer import Tokenizer
from specserve.errors import InvalidRequestError, ModelLoadError

Conversation = list[dict[str, str]]

TRICKY_TEXTS = [
    "héllo wörld, naïve café",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵!",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\r\n\n    pass   \n",
    "numbers 3.14159 1,000,000 ²³ ١٢٣",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "   leading and trailing spaces   ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(model_path)


@pytest.fixture(scope="module")
def transformers_gguf(model_path: Path) -> Any:
    """transformers' own tokenizer for the same GGUF; slow to build, so once per module."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)


@pytest.fixture(scope="module")
def reference(transformers_gguf: Any) -> Any:
    """transformers' GGUF tokenizer with its pre-tokenizer set to SmolLM2's own.

    transformers 5.23 does not know llama.cpp's 'smollm' pre-tokenizer and falls back to plain GPT-2
    splitting; SmolLM2's tokenizer.json (and llama.cpp) split digits off first. Everything else --
    vocabulary, merges, special tokens, template, decoder -- is transformers' as loaded.
    """
    reference = copy.deepcopy(transformers_gguf)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return reference


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def conversations(data_dir: Path) -> list[Conversation]:
    """One user turn per Spec-Bench and GSM8K prompt, plus two-turn chats built from pairs of GSM8K problems."""
    spec_bench = read_jsonl(data_dir / "spec_bench" / "question.jsonl")
    gsm8k = read_jsonl(data_dir / "gsm8k" / "test_head1119.jsonl")
    single = [[{"role": "user", "content": q["turns"][0]}] for q in spec_bench]
    single += [[{"role": "user", "content": q["question"]}] for q in gsm8k]
    two_turns = [
        [
            {"role": "user", "content": first["question"]},
            {"role": "assistant", "content": first["answer"]},
            {"role": "user", "content": second["question"]},
        ]
        for first, second in zip(gsm8k[::2], gsm8k[1::2])
    ]
    return single + two_turns


@pytest.fixture(scope="module")
def prompts(conversations: list[Conversation]) -> list[str]:
    return [m["content"] for conv in conversations for m in conv]


def tiny_gguf(path: Path, model: str | None = "gpt2", pre: str = "gpt2", chat_template: str | None = None) -> Path:
    """A GGUF holding only tokenizer metadata: vocabulary <s> a b ab Ġ with the one merge `a b`."""
    writer = gguf.GGUFWriter(path, "llama")
    if model is not None:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(["<s>", "a", "b", "ab", "Ġ"])
        writer.add_token_types([3, 1, 1, 1, 1])
        writer.add_token_merges(["a b"])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_smollm2_special_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert [tokenizer.id_to_token(i) for i in tokenizer.eos_token_ids] == ["<|im_end|>", "<|endoftext|>"]
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tokenizer.decode([1, 4093, 2]) == "user"
    assert tokenizer.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"


def test_encode_adds_no_bos_when_model_says_not_to(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("Hello world") == tokenizer.encode("Hello world", add_special_tokens=False)


def test_bytes_missing_from_the_vocabulary_are_dropped(tokenizer: Tokenizer) -> None:
    """SmolLM2's byte alphabet lacks 21 bytes (e.g. 0x04); like its HF tokenizer, BPE without unk drops them."""
    assert tokenizer.decode(tokenizer.encode("a\x04b")) == "ab"


def test_digits_split_one_by_one(tokenizer: Tokenizer) -> None:
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("x 2025")] == ["x", "Ġ", "2", "0", "2", "5"]


@pytest.mark.parametrize(
    "text, smollm, plain_gpt2",
    [
        ("a  2", ["a", "ĠĠ", "2"], ["a", "Ġ", "Ġ", "2"]),
        ("ate ¾", ["ate", "Ġ", "Â¾"], ["ate", "ĠÂ", "¾"]),
    ],
)
def test_whitespace_before_numbers_follows_smollm(
    tokenizer: Tokenizer, transformers_gguf: Any, text: str, smollm: list[str], plain_gpt2: list[str]
) -> None:
    """Where transformers' GGUF loader (plain GPT-2 splitting) and SmolLM2's own tokenizer disagree.

    If a newer transformers learns 'smollm', the second assert fails: then drop the patch in `reference`.
    """
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode(text)] == smollm
    assert transformers_gguf.tokenize(text) == plain_gpt2


def test_encode_matches_transformers(tokenizer: Tokenizer, reference: Any, prompts: list[str]) -> None:
    texts = prompts + TRICKY_TEXTS
    mismatched = [t for t in texts if tokenizer.encode(t) != reference.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, first: {mismatched[0]!r}"


def test_chat_prompt_ids_match_transformers(
    tokenizer: Tokenizer, reference: Any, conversations: list[Conversation]
) -> None:
    mismatched = [
        conv
        for conv in conversations
        if tokenizer.render_prompt_ids(conv)
        != reference.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)["input_ids"]
    ]
    assert not mismatched, f"{len(mismatched)} of {len(conversations)} differ, first: {mismatched[0]!r}"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_text_matches_transformers(
    tokenizer: Tokenizer, reference: Any, add_generation_prompt: bool
) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "  Code?\n\tx = 1\n"},
    ]
    for conv in (conversation, conversation[1:]):
        expected = reference.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == expected


def test_decode_round_trip(tokenizer: Tokenizer, reference: Any, prompts: list[str]) -> None:
    for text in prompts + TRICKY_TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("chunk", [1, 3], ids=["one_token", "three_accepted"])
@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_equals_decode(tokenizer: Tokenizer, text: str, chunk: int, skip_special_tokens: bool) -> None:
    ids = tokenizer.encode(text)
    stream = tokenizer.stream(skip_special_tokens=skip_special_tokens)
    pieces = [stream.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_decode_on_random_ids(tokenizer: Tokenizer, seed: int) -> None:
    """Sampling can emit any id, including byte tokens that never form valid UTF-8."""
    rng = random.Random(seed)
    single_bytes = range(17, 252)  # SmolLM2's 235 single-byte tokens follow its 17 control tokens
    ids = [rng.choice(single_bytes) if rng.random() < 0.5 else rng.randrange(tokenizer.vocab_size) for _ in range(500)]
    stream = tokenizer.stream()
    text, start = "", 0
    while start < len(ids):
        accepted = rng.randint(1, 4)
        text += stream.step(ids[start : start + accepted])
        start += accepted
    assert text + stream.finish() == tokenizer.decode(ids)


def test_stream_holds_back_half_a_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("世")
    assert len(ids) > 1, "世 should span several byte-level tokens"
    stream = tokenizer.stream()
    assert [stream.step(i) for i in ids] == [""] * (len(ids) - 1) + ["世"]


def test_stream_finish_flushes_an_unfinished_character(tokenizer: Tokenizer) -> None:
    first_byte_of_cjk = tokenizer.encode("世")[0]
    stream = tokenizer.stream()
    assert stream.step(tokenizer.encode("ok")) == "ok"
    assert stream.step(first_byte_of_cjk) == ""
    assert stream.finish() == "\ufffd" == tokenizer.decode([first_byte_of_cjk])


def test_from_hf_dir_matches_gguf(tmp_path: Path, tokenizer: Tokenizer, reference: Any, prompts: list[str]) -> None:
    reference.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert (hf.vocab_size, hf.bos_token_id, hf.eos_token_ids) == (49152, 1, (2, 0))
    for text in prompts[:200] + TRICKY_TEXTS:
        assert hf.encode(text) == tokenizer.encode(text)
        messages = [{"role": "user", "content": text}]
        assert hf.render_prompt_ids(messages) == tokenizer.render_prompt_ids(messages)


def test_tiny_gguf_encodes_with_its_merges(tmp_path: Path) -> None:
    tiny = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    assert tiny.encode("ab ab") == [3, 4, 3]
    assert tiny.decode([0, 3, 4, 1]) == "ab a"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"model": None}, "no tokenizer metadata"),
        ({"model": "llama"}, "unsupported tokenizer.ggml.model 'llama'"),
        ({"pre": "qwen2"}, "unsupported tokenizer.ggml.pre 'qwen2'"),
    ],
    ids=["no_metadata", "sentencepiece", "unknown_pre_tokenizer"],
)
def test_unsupported_gguf(tmp_path: Path, metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as exc:
        Tokenizer.from_gguf(tiny_gguf(tmp_path / "bad.gguf", **metadata))
    assert "\n" not in str(exc.value)


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"definitely not GGUF")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        Tokenizer.from_gguf(path)


def test_missing_hf_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_chat_template(tmp_path: Path) -> None:
    tiny = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf"))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tiny.render_prompt_ids([{"role": "user", "content": "a"}])


def test_template_raise_exception(tmp_path: Path) -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    tiny = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf", chat_template=template))
    with pytest.raises(InvalidRequestError, match="first message must be user"):
        tiny.apply_chat_template([{"role": "assistant", "content": "a"}])


def test_template_tojson_keeps_html_and_unicode(tmp_path: Path) -> None:
    tiny = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages[0] | tojson }}"))
    message = {"role": "user", "content": "<b>é</b>"}
    assert tiny.apply_chat_template([message]) == '{"role": "user", "content": "<b>é</b>"}'


def test_template_is_sandboxed(tmp_path: Path) -> None:
    template = "{{ messages.__class__.__mro__ }}"
    tiny = Tokenizer.from_gguf(tiny_gguf(tmp_path / "tiny.gguf", chat_template=template))
    with pytest.raises(InvalidRequestError):
        tiny.apply_chat_template([{"role": "user", "content": "a"}])

"""The self-distillation corpus: which prompt text each source row gives, how sources mix, the ragged
layout, and (real model) that a built corpus holds the target's greedy responses and hidden states and is
reused from its cache."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from specserve.engine.llm_engine import LLMEngine
from specserve.errors import InvalidRequestError
from specserve.learned.distill_data import (
    DistillConfig,
    DistillCorpus,
    build_corpus,
    final_hidden_states,
    prompt_text,
    read_prompts,
    select_prompts,
)


@pytest.mark.parametrize("row,expected", [
    ({"id": "a_0", "prompts": ["first", "second"], "first_speaker": "human"}, "first"),
    ({"id": "a_1", "prompts": ["answers a dropped turn"], "first_speaker": "gpt"}, ""),
    ({"question": " How many? ", "answer": "4 #### 4"}, "How many?"),
    ({"instruction": "Sort this.", "input": "3, 1, 2", "output": "1, 2, 3"}, "Sort this.\n\n3, 1, 2"),
    ({"instruction": "Write a haiku.", "input": "", "response": "..."}, "Write a haiku."),
    ({"instruction": "Classify.", "instances": [{"input": "cat", "output": "animal"}]}, "Classify.\n\ncat"),
])
def test_prompt_text_is_the_user_side(row, expected):
    assert prompt_text(row) == expected


def test_sources_are_shuffled_then_interleaved(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question": f"a{i}"}) + "\n" for i in range(5)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"instruction": f"b{i}"}) + "\n" for i in range(2)))
    prompts = read_prompts(tmp_path, seed=0)
    assert sorted(prompts) == sorted([f"a{i}" for i in range(5)] + ["b0", "b1"])
    assert [p[0] for p in prompts[:4]] == ["a", "b", "a", "b"]
    assert prompts == read_prompts(tmp_path, seed=0) and prompts != read_prompts(tmp_path, seed=1)


def test_long_prompts_are_skipped(tokenizer):
    config = DistillConfig(num_prompts=2, max_prompt_tokens=40)
    selected = select_prompts(["short one", "word " * 100, "short two"], tokenizer, config)
    assert [tokenizer.decode(ids).count("short") for ids in selected] == [1, 1] and len(selected) == 2


def test_ragged_layout_and_data_hash():
    corpus = DistillCorpus(torch.tensor([5, 6, 8, 2, 7, 9, 2]), torch.tensor([0, 4, 7]), torch.tensor([2, 1]),
                           torch.zeros(7, 3, dtype=torch.bfloat16))
    assert corpus.response_token_ids().tolist() == [8, 2, 9, 2]
    assert corpus.subset([1]).token_ids.tolist() == [7, 9, 2] and corpus.subset([1]).prompt_lens.tolist() == [1]
    changed = DistillCorpus(torch.tensor([5, 6, 8, 2, 7, 9, 3]), corpus.offsets, corpus.prompt_lens, corpus.hidden)
    moved = DistillCorpus(corpus.token_ids, torch.tensor([0, 3, 7]), corpus.prompt_lens, corpus.hidden)
    assert len({corpus.data_hash(), changed.data_hash(), moved.data_hash()}) == 3


def test_corpus_is_the_targets_and_is_cached(model_path, data_dir, llama_model, tmp_path, monkeypatch):
    config = DistillConfig(num_prompts=3, max_new_tokens=6)
    corpus = build_corpus(str(model_path), data_dir / "train", tmp_path, config, "test", model=llama_model)
    assert corpus.num_sequences == 3 and corpus.hidden.dtype == torch.bfloat16
    for k in range(3):
        token_ids, hidden, prompt_len = corpus.sequence(k)
        fresh = final_hidden_states(llama_model, token_ids.tolist())
        torch.testing.assert_close(hidden.float(), fresh, atol=0.05, rtol=0.01)  # bfloat16 storage
        greedy = llama_model.lm_head(fresh[prompt_len - 1 : -1]).argmax(-1)
        assert greedy.tolist() == token_ids[prompt_len:].tolist()  # each response token is the target's argmax

    def no_engine(*args: object) -> None:
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(LLMEngine, "__init__", no_engine)  # no model given either: it would be loaded
    again = build_corpus(str(model_path), data_dir / "train", tmp_path, config, fingerprint="test")
    assert again.data_hash() == corpus.data_hash()


def test_sampled_corpus_has_its_own_folder_and_reproduces(model_path, data_dir, llama_model, tmp_path):
    """Responses sampled at a temperature (seeded per prompt) are not all the target's argmax, are the
    same on a rebuild, and live in their own cache folder."""
    from specserve.learned.distill_data import corpus_dir

    greedy = DistillConfig(num_prompts=2, max_new_tokens=12)
    sampled = replace(greedy, temperature=1.0)
    train = data_dir / "train"
    assert corpus_dir(tmp_path, train, greedy, "t") != corpus_dir(tmp_path, train, sampled, "t")
    build = lambda where: build_corpus(str(model_path), train, where, sampled, "t", model=llama_model)  # noqa: E731
    first, again = build(tmp_path / "a"), build(tmp_path / "b")
    assert first.data_hash() == again.data_hash()
    off_argmax = 0
    for k in range(first.num_sequences):
        token_ids, hidden, prompt_len = first.sequence(k)
        argmax = llama_model.lm_head(hidden[prompt_len - 1 : -1].float()).argmax(-1)
        off_argmax += int((argmax != token_ids[prompt_len:]).sum())
    assert off_argmax > 0  # greedy answers would have none (test above)
    with pytest.raises(InvalidRequestError, match="temperature"):
        DistillConfig(temperature=-1.0)

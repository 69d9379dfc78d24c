"""The speculative benchmark's arithmetic: per-category rates, the Spec-Bench mix, speedups and targets."""

from __future__ import annotations

import pytest

from specserve.bench.spec import (
    PLAIN,
    SPEC_BENCH_MIX,
    Prompt,
    Run,
    SpecBenchConfig,
    doc_section,
    rates,
    table,
    targets_text,
)

# Two Spec-Bench categories and GSM8K (reported, but not part of the mix).
PROMPTS = [Prompt("qa", [1]), Prompt("rag", [1]), Prompt("gsm8k", [1])]
SYSTEMS = {
    PLAIN: [Run(10, 1.0, 10), Run(10, 1.0, 10), Run(10, 1.0, 10)],
    "specserve ngram": [Run(10, 0.5, 5), Run(10, 0.25, 4), Run(10, 0.1, 2)],
}


def test_rates_per_category_and_mix():
    by_row = rates(SYSTEMS, PROMPTS)
    assert list(by_row) == ["qa", "rag", "gsm8k", SPEC_BENCH_MIX]  # extra sets after the categories
    assert by_row["rag"]["specserve ngram"] == (40.0, 2.5)
    # The mix pools tokens and seconds of qa and rag only: 20 tokens / 0.75 s, 20 tokens / 9 forwards.
    assert by_row[SPEC_BENCH_MIX]["specserve ngram"] == pytest.approx((20 / 0.75, 20 / 9))


def test_table_shows_speedup_and_tau_and_no_transformers_columns_without_it():
    lines = table(rates(SYSTEMS, PROMPTS)).splitlines()
    assert lines[0] == ("| category | specserve plain tok/s | specserve ngram tok/s | specserve ngram vs plain "
                        "| specserve ngram tau |")
    assert lines[3] == "| rag | 10.0 | 40.0 | 4.00x | 2.50 |"


def test_targets_name_the_best_drafter():
    text = targets_text(rates(SYSTEMS, PROMPTS))
    assert "best drafter >= 1.8x plain decoding on Spec-Bench mix: specserve ngram 2.67x, met" in text
    assert "on summarization: not measured in this run" in text
    assert "on rag: specserve ngram 4.00x, met" in text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_doc_section_says_how_tokens_were_chosen(data_dir, tmp_path, temperature):
    config = SpecBenchConfig(model_path=tmp_path / "m.gguf", data_dir=data_dir, datastore=tmp_path / "ds.npz",
                             drafters=("ngram",), temperature=temperature)
    text = doc_section(config, hf=False, load_average=0.0, num_prompts=3, result="TABLE")
    title = text.splitlines()[0]
    if temperature == 0:
        assert title == "## Speculative decoding, batch 1 (`specserve bench spec`)"
        assert "- Method: greedy, batch 1, up to 128 new tokens" in text
    else:
        assert title == "## Speculative decoding, batch 1, sampled at temperature 1 (`specserve bench spec`)"
        assert "- Method: sampled at temperature 1 (seed 0 per request), batch 1, up to 128 new" in text
    assert text.endswith("TABLE")

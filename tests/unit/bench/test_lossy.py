"""GSM8K scoring and the lossy study's report: answer extraction, accuracy, the issue's criterion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specserve.bench.common import GSM8K_FILE, GSM8K_TRAIN_FILE
from specserve.bench.lossy import (
    EXTRA_SETTINGS, LossyBenchConfig, SettingRun, criterion_text, is_correct, last_number, load_problems,
    parse_settings, same_answer, table,
)
from specserve.cli import build_parser
from specserve.engine.acceptance import LossyConfig
from specserve.errors import InvalidRequestError


@pytest.mark.parametrize(
    "text,number",
    [
        ("She makes $18 every day.", 18.0),
        ("That is 1,234.50 in total", 1234.5),
        ("16 - 3 - 4 = 9", 9.0),
        ("she has 16-3", 3.0),  # a subtraction, not the negative number -3
        ("The temperature fell to -3", -3.0),
        ("3 apples and 2.5 pears", 2.5),
        ("costs 5, then 6.", 6.0),  # "6." ends a sentence: no decimal point
        ("1,000,000 grains", 1_000_000.0),
        ("#### 72", 72.0),
        ("no number here", None),
        ("model x2", None),  # glued to a word: a name, not an answer
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


@pytest.mark.parametrize(
    "answer,gold,correct",
    [
        ("Janet sells 9 eggs at $2, so she makes $18.", 18.0, True),
        ("The answer is 18.0", 18.0, True),
        ("She has 18 eggs and sells 9", 18.0, False),  # the last number counts, not any number
        ("I am not sure.", 18.0, False),
        ("", 18.0, False),
        ("It costs $1,250", 1250.0, True),
    ],
)
def test_is_correct(answer, gold, correct):
    assert is_correct(answer, gold) is correct


def test_gold_answer_is_the_number_after_the_mark(tmp_path: Path):
    (tmp_path / GSM8K_FILE).parent.mkdir(parents=True)
    rows = [{"question": "q1", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,234"}, {"question": "q2", "answer": "#### -5"}]
    (tmp_path / GSM8K_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(tmp_path, 5)
    assert [(p.question, p.gold) for p in problems] == [("q1", 1234.0), ("q2", -5.0)]


def test_real_gsm8k_first_problem(data_dir: Path):
    (first,) = load_problems(data_dir, 1)
    assert "ducks" in first.question and first.gold == 18.0


def test_train_split_reads_the_train_problems(tmp_path: Path):
    for name, question in ((GSM8K_FILE, "test question"), (GSM8K_TRAIN_FILE, "train question")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"question": question, "answer": "#### 3"}) + "\n")
    assert [p.question for p in load_problems(tmp_path, 5, "train")] == ["train question"]
    assert [p.question for p in load_problems(tmp_path, 5)] == ["test question"]


def test_real_gsm8k_train_first_problem(data_dir: Path):
    (first,) = load_problems(data_dir, 1, "train")
    assert "Natalia" in first.question and first.gold == 72.0


def test_unknown_split_is_a_clear_error(data_dir: Path):
    with pytest.raises(InvalidRequestError, match="split must be one of test, train"):
        LossyBenchConfig(model_path=Path("m.gguf"), data_dir=data_dir, datastore=Path("d.npz"), split="dev")


def test_cli_takes_the_split():
    args = build_parser().parse_args(["bench", "lossy", "--split", "train"])
    assert args.split == "train"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "lossy", "--split", "dev"])


def run_of(lossy: LossyConfig | None, correct: int, n: int = 200, forwards: int = 2000) -> SettingRun:
    """`n` outputs of 10 tokens each, `correct` of them right, one second in all."""
    return SettingRun(lossy, [[1] * 10] * n, [i < correct for i in range(n)], 1.0, forwards)


def test_accuracy_tok_per_s_and_tau():
    run = run_of(None, correct=50, n=200, forwards=1000)
    assert run.accuracy == 25.0 and run.tok_per_s == 2000.0 and run.tau == 2.0


@pytest.mark.parametrize(
    "default_correct,default_forwards,n,verdict",
    [
        (99, 1500, 200, "met"),  # -0.5 points, tau 1.33x
        (98, 1500, 200, "met"),  # exactly -1 point
        (97, 1500, 200, "NOT met"),  # -1.5 points
        (100, 1600, 200, "NOT met"),  # tau 1.25x
        (int(0.5 * 199), 1500 * 199 // 200, 199, "NOT met"),  # too few problems
    ],
)
def test_criterion(default_correct, default_forwards, n, verdict):
    lossless = run_of(None, correct=n // 2, n=n, forwards=2000 * n // 200)
    runs = [lossless, run_of(LossyConfig(), default_correct, n, default_forwards)]
    assert criterion_text(runs).endswith(f", {verdict}")


def test_criterion_without_the_default_setting():
    runs = [run_of(None, 100), run_of(LossyConfig(top_k=2), 100, forwards=1000)]
    assert criterion_text(runs).endswith("not measured in this run")


def test_table_counts_outputs_and_final_answers_that_differ_from_lossless():
    lossless = SettingRun(None, [[1, 2], [3, 4], [5]], [True, False, True], 1.0, 6, [18.0, None, 4.0])
    lossy = SettingRun(LossyConfig(), [[1, 2], [3, 5], [6]], [True, True, False], 0.5, 3, [18.0, 7.0, None])
    rows = table([lossless, lossy]).splitlines()
    assert rows[2].startswith("| lossless |") and rows[2].endswith("| 0/3 | 3/3 | 0 / 0 |")
    assert rows[3] == ("| lossy (default) | 3 | 0.3 | 8 | 66.7% (2/3) | 10.0 | 2.00x | 1.67 | 2.00x | 2/3 | 1/3 "
                       "| 1 / 1 |")
    no_answers = SettingRun(LossyConfig(top_k=2), [[1, 2], [3, 4], [5]], [True, False, True], 1.0, 6)
    assert table([lossless, no_answers]).splitlines()[3].endswith("| 0/3 | - | 0 / 0 |")


def test_answers_are_the_same_when_both_numbers_match_or_both_are_missing():
    assert same_answer(18.0, 18.0) and same_answer(None, None)
    assert not same_answer(18.0, None) and not same_answer(None, 18.0) and not same_answer(18.0, 18.5)
    assert is_correct("so the answer is 1,234", 1234.0) and not is_correct("no number here", 0.0)


def test_parse_settings():
    assert parse_settings("2:0.8:1,0:0.1:8") == (LossyConfig(2, 0.8, 1.0), LossyConfig(0, 0.1, 8.0))


@pytest.mark.parametrize("text,needle", [("2:0.8", "top_k:min_ratio:budget"), ("a:0.5:2", "top_k:min_ratio:budget"),
                                         ("2:1.5:2", "min_ratio")])
def test_bad_settings(text, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        parse_settings(text)


def test_cli_help_shows_the_default_settings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "lossy", "--help"])
    shown = ",".join(f"{s.top_k}:{s.min_ratio:g}:{s.budget:g}" for s in EXTRA_SETTINGS)
    assert shown in " ".join(capsys.readouterr().out.split())

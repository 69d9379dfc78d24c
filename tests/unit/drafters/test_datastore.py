"""Token datastore: suffix sorting, longest-suffix lookup, continuations, the file format and `datastore build`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from specserve.cli import main
from specserve.drafters.datastore import (
    SEPARATOR,
    DatastoreError,
    TokenDatastore,
    document_text,
    read_documents,
    sort_suffixes,
    tokenizer_fingerprint,
)
from specserve.drafters.rest import RestDrafter
from specserve.drafters.base import DraftRequest
from specserve.errors import InvalidRequestError

S = SEPARATOR
# positions:       0  1  2  3  4  5  6  7  8  9 10 11 12 13
# tokens:          1  2  3  4  S  2  3  5  S  9  2  3  4  S
DOCS = [[1, 2, 3, 4], [2, 3, 5], [9, 2, 3, 4]]


@pytest.fixture
def store() -> TokenDatastore:
    return TokenDatastore.from_documents(DOCS, fingerprint="test-vocab")


def test_documents_joined_by_separator(store):
    assert store.tokens.tolist() == [1, 2, 3, 4, S, 2, 3, 5, S, 9, 2, 3, 4, S]
    assert store.num_documents == 3


def test_sort_suffixes_worked_example():
    assert sort_suffixes(np.array([3, 1, 3, 2], np.int32), depth=2).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sort_suffixes_orders_prefixes_like_lists(depth, seed):
    tokens = np.random.default_rng(seed).integers(-1, 3, size=200).astype(np.int32)  # -1 = SEPARATOR
    order = sort_suffixes(tokens, depth).tolist()
    prefixes = [tokens[i:i + depth].tolist() for i in order]
    assert sorted(order) == list(range(len(tokens))) and prefixes == sorted(prefixes)


@pytest.mark.parametrize("depth", [1, 2, 4, 16])
def test_sort_suffixes_ties_by_position_at_power_of_two_depth(depth):
    tokens = np.random.default_rng(depth).integers(-1, 3, size=200).astype(np.int32)
    expected = sorted(range(len(tokens)), key=lambda i: (tokens[i:i + depth].tolist(), i))
    assert sort_suffixes(tokens, depth).tolist() == expected


def test_lookup_finds_every_occurrence(store):
    match = store.lookup([9, 2, 3])
    assert match.length == 3 and match.starts.tolist() == [12]  # continuation of "9 2 3" starts at 12


def test_longest_suffix_fallback(store):
    match = store.lookup([7, 2, 3])  # "7 2 3" never occurs; "2 3" does, three times
    assert match.length == 2 and sorted(match.starts.tolist()) == [3, 7, 12]


def test_fallback_to_min_len(store):
    match = store.lookup([8, 3, 4])
    assert match.length == 2 and sorted(match.starts.tolist()) == [4, 13]


@pytest.mark.parametrize("query", [[7, 8], [2], [], [4, 2]], ids=["unknown", "too-short", "empty", "across-documents"])
def test_no_match(store, query):
    match = store.lookup(query)
    assert match.length == 0 and len(match.starts) == 0


def test_max_len_caps_the_suffix(store):
    assert store.lookup([1, 2, 3, 4], max_len=2).length == 2
    assert store.lookup([1, 2, 3, 4]).length == 4


def test_max_matches_thins_evenly():
    store = TokenDatastore.from_documents([[1, 2, k] for k in range(10, 20)], fingerprint="v")
    starts = store.lookup([1, 2], max_matches=4).starts
    follow = store.tokens[starts].tolist()
    assert len(set(follow)) == 4 and follow[0] == 10 and follow[-1] == 19  # both ends of the range, spread


def test_continuations_stop_at_document_end():
    store = TokenDatastore.from_documents([[4, 5], [6]], fingerprint="v")  # 4 5 S 6 S
    assert store.continuations(np.array([0, 3, 2]), max_depth=3) == [[4, 5], [6], []]


def test_save_load_round_trip(store, tmp_path):
    path = tmp_path / "store.npz"
    store.save(path)
    loaded = TokenDatastore.load(path, fingerprint="test-vocab")
    assert loaded.tokens.tolist() == store.tokens.tolist()
    assert loaded.suffix_array.tolist() == store.suffix_array.tolist()
    assert (loaded.sort_depth, loaded.fingerprint, loaded.num_documents) == (16, "test-vocab", 3)
    assert loaded.lookup([7, 2, 3]).length == 2


def _assert_one_line_error(path: Path, needle: str, fingerprint: str | None = None) -> None:
    with pytest.raises(DatastoreError) as info:
        TokenDatastore.load(path, fingerprint)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message, message
    assert isinstance(info.value, InvalidRequestError) and "specserve datastore build" in message


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nope.npz", "no datastore at")


def test_truncated_file(store, tmp_path):
    path = tmp_path / "store.npz"
    store.save(path)
    path.write_bytes(path.read_bytes()[:200])
    _assert_one_line_error(path, "not a readable datastore")


def test_not_a_datastore(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line_error(path, "not a readable datastore")


def _save_raw(path: Path, store: TokenDatastore, **header_changes) -> None:
    store.save(path)
    with np.load(path) as npz:
        header = json.loads(str(npz["header"])) | header_changes
        tokens, suffix_array = npz["tokens"], npz["suffix_array"]
    with open(path, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header)), tokens=tokens, suffix_array=suffix_array)


def test_checksum_mismatch(store, tmp_path):
    _save_raw(tmp_path / "store.npz", store, sha256="0" * 64)
    _assert_one_line_error(tmp_path / "store.npz", "fails its checksum")


def test_wrong_version(store, tmp_path):
    _save_raw(tmp_path / "store.npz", store, version=99)
    _assert_one_line_error(tmp_path / "store.npz", "version 99")


def test_wrong_tokenizer(store, tmp_path):
    store.save(tmp_path / "store.npz")
    _assert_one_line_error(tmp_path / "store.npz", "another tokenizer", fingerprint="other-vocab")


@pytest.mark.parametrize(
    "row,text",
    [
        ({"question": "Q?", "answer": "A."}, "Q?\n\nA."),
        ({"instruction": "Do", "input": "", "output": "done"}, "Do\n\ndone"),
        ({"instruction": "Do", "input": "x", "response": "y"}, "Do\n\nx\n\ny"),
        ({"id": "t0", "name": "n", "instruction": "Do", "instances": [{"input": "x", "output": "y"}],
          "is_classification": False}, "Do\n\nx\n\ny"),
        ({"id": "s_0", "prompts": ["hi", "more"], "first_speaker": "human", "n_turns_original": 4}, "hi\n\nmore"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "hi\n\nhello"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "hi\n\nyo"),
        ({"id": "x", "score": 3}, ""),
    ],
    ids=["gsm8k", "code-alpaca", "gpteacher", "alpaca-seed", "sharegpt-prompts", "sharegpt", "chat", "no-text"],
)
def test_document_text(row, text):
    assert document_text(row) == text


@pytest.mark.parametrize(
    "lines,needle",
    [
        (['{"text": "ok"}', '{"text": "bad"'], ":2: not valid JSON"),
        (['{"text": "ok"}', "", "[1, 2]"], ":3: expected a JSON object"),
        (['{"id": 1}'], "no text found"),
    ],
    ids=["malformed-line", "not-an-object", "no-text"],
)
def test_read_documents_errors(tmp_path, lines, needle):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestError, match=needle):
        list(read_documents(path))


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_build_then_draft(tokenizer, model_path, data_dir, tmp_path, capsys):
    corpus = [data_dir / "train" / "gsm8k_train.jsonl", data_dir / "train" / "code_alpaca_2k.jsonl"]
    out = tmp_path / "store.npz"
    code, stdout, _ = run_main(capsys, "datastore", "build", *map(str, corpus), "--out", str(out),
                               "--model", str(model_path), "--max-docs", "300")
    assert code == 0
    assert stdout.count("\n") == 1 and "300 documents" in stdout and str(out) in stdout

    store = TokenDatastore.load(out, tokenizer_fingerprint(tokenizer))
    with open(corpus[0]) as f:
        document = tokenizer.encode(document_text(json.loads(f.readline())), add_special_tokens=False)
    query = document[:30]
    tree = RestDrafter(store).propose([DraftRequest(seq_id=0, token_ids=query, num_prompt_tokens=30, budget=16)])[0]
    assert tree.num_nodes > 0 and tree.tokens[0] == document[30]  # the corpus's own next token ranks first
    windows = np.lib.stride_tricks.sliding_window_view
    for node in range(tree.num_nodes):  # every drafted path follows the query's suffix somewhere in the corpus
        drafted = query[-2:] + [tree.tokens[i] for i in tree.path_to(node)]
        assert (windows(store.tokens, len(drafted)) == drafted).all(axis=1).any()


def test_cli_build_default_out(model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECSERVE_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n')
    code, stdout, _ = run_main(capsys, "datastore", "build", str(corpus), "--model", str(model_path))
    assert code == 0 and str(tmp_path / "home" / "datastores" / "default.npz") in stdout
    assert TokenDatastore.load(tmp_path / "home" / "datastores" / "default.npz").num_documents == 1


@pytest.mark.parametrize(
    "content,extra,needle",
    [
        (None, (), "no such file"),
        ('{"text": "ok"}\n{oops}\n', (), "c.jsonl:2: not valid JSON"),
        ('{"id": 1}\n', (), "no text found"),
        ('{"text": "ok"}\n', ("--max-docs", "0"), "--max-docs"),
    ],
    ids=["missing-file", "malformed-line", "no-text", "bad-max-docs"],
)
def test_cli_bad_input_exits_with_one_line(model_path, tmp_path, capsys, content, extra, needle):
    corpus = tmp_path / "c.jsonl"
    if content is not None:
        corpus.write_text(content)
    code, stdout, stderr = run_main(capsys, "datastore", "build", str(corpus), "--out", str(tmp_path / "o.npz"),
                                    "--model", str(model_path), *extra)
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "" and not (tmp_path / "o.npz").exists()
    assert len(lines) == 1 and lines[0].startswith("specserve: error:") and needle in lines[0], stderr

"""The retrieval drafter's token datastore: a corpus tokenized into one array, plus its suffix array.

`lookup` finds where the longest suffix of a sequence occurs in the corpus; the tokens that follow
those occurrences are what `drafters.rest` drafts (He et al. 2023, "REST: Retrieval-Based
Speculative Decoding"). Built from JSONL corpora by `specserve datastore build`, saved as one .npz.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import zipfile
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from specserve.engine.tokenizer import Tokenizer
from specserve.errors import InvalidRequestError

FORMAT = "specserve-datastore"
FORMAT_VERSION = 1
SEPARATOR = -1  # ends every document; no query contains it, so no match or continuation crosses documents
DEFAULT_SORT_DEPTH = 16  # suffixes are ordered by this many leading tokens: the longest usable query suffix

# The fields of a corpus row that hold text, in the order they are joined into the row's document
# (blank line between pieces). Lists are read item by item and nested objects by these same names, so
# ShareGPT {"conversations": [{"from", "value"}]}, chat {"messages": [{"role", "content"}]}, Alpaca
# {"instruction", "instances": [{"input", "output"}]}, {"instruction", "input", "output" | "response"},
# {"question", "answer"} and {"prompts": [...]} all read naturally. Other fields (ids, names, roles,
# flags, counts) are metadata and skipped. Spec-Bench's "turns" is deliberately absent: benchmark
# prompts must never become drafts.
TEXT_FIELDS = ("system", "instruction", "question", "prompt", "prompts", "conversations", "messages", "instances",
               "input", "output", "response", "answer", "value", "content", "text")


class DatastoreError(InvalidRequestError):
    """A datastore file is missing, unreadable, of another format version or built for another tokenizer."""


@dataclass(frozen=True)
class SuffixMatch:
    """Where the longest matching suffix of a query occurs in the datastore."""

    length: int  # tokens of the query's suffix that matched; 0 = nothing matched
    starts: np.ndarray  # [num_matches] int64 position right after each occurrence: where its continuation begins


def check_datastore_file(path: str | Path) -> Path:
    """`path` as a Path, if a file is there (`TokenDatastore.load` reads and verifies it)."""
    path = Path(path)
    if not path.is_file():
        raise DatastoreError(f"no datastore at {path}; {build_hint(path)}")
    return path


@dataclass(frozen=True)
class TokenDatastore:
    tokens: np.ndarray  # [num_tokens] int32 documents, each followed by SEPARATOR
    suffix_array: np.ndarray  # [num_tokens] int32 start positions ordered by their first `sort_depth` tokens
    sort_depth: int
    fingerprint: str  # tokenizer_fingerprint() of the tokenizer that produced `tokens`
    num_documents: int

    def __post_init__(self) -> None:
        assert self.tokens.dtype == self.suffix_array.dtype == np.int32, "tokens and suffix array are int32"
        assert self.tokens.shape == self.suffix_array.shape and self.tokens.ndim == 1, "one suffix per token"
        assert self.sort_depth >= 1

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int] | np.ndarray], fingerprint: str,
                       sort_depth: int = DEFAULT_SORT_DEPTH) -> TokenDatastore:
        """Join token-id documents (each followed by SEPARATOR) and sort their suffixes."""
        ends = np.cumsum([len(doc) + 1 for doc in documents], dtype=np.int64)  # one past each SEPARATOR
        tokens = np.full(int(ends[-1]) if len(ends) else 0, SEPARATOR, np.int32)
        for doc, end in zip(documents, ends.tolist()):
            tokens[end - 1 - len(doc):end - 1] = doc
        return cls(tokens, sort_suffixes(tokens, sort_depth), sort_depth, fingerprint, len(documents))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def lookup(self, token_ids: Sequence[int], min_len: int = 2, max_len: int = DEFAULT_SORT_DEPTH,
               max_matches: int = 256) -> SuffixMatch:
        """Occurrences of the longest suffix of `token_ids` (min_len..max_len tokens) found in the corpus.

        Longer suffixes occur only where their own suffixes do, so the longest length that matches is
        found by binary search over lengths. More than `max_matches` occurrences are thinned to
        `max_matches` spread evenly over the suffix array.
        """
        assert 1 <= min_len and max_matches >= 1
        max_len = min(max_len, self.sort_depth, len(token_ids))
        found: tuple[int, int, int] | None = None  # (length, first, end) in suffix-array rows
        lo, hi = min_len, max_len  # the answer lies in [lo, hi] if anything matches at all
        while lo <= hi:
            length = (lo + hi + 1) // 2 if found else lo  # test the shortest first: most queries stop there
            first, end = self._suffix_range(token_ids[len(token_ids) - length:])
            if first < end:
                found, lo = (length, first, end), length + 1
            elif found:
                hi = length - 1
            else:
                break
        if found is None:
            return SuffixMatch(0, np.zeros(0, np.int64))
        length, first, end = found
        rows = np.arange(first, end) if end - first <= max_matches else np.linspace(first, end - 1, max_matches)
        return SuffixMatch(length, self.suffix_array[rows.astype(np.int64)].astype(np.int64) + length)

    def continuations(self, starts: np.ndarray, max_depth: int) -> list[list[int]]:
        """Up to `max_depth` tokens from each start, cut where its document ends (so possibly empty).

        Example: tokens [4, 5, SEP, 6, SEP], starts [0, 3, 2], max_depth 3 -> [[4, 5], [6], []].
        """
        index = starts[:, None] + np.arange(max_depth)[None, :]  # [num_matches, max_depth]
        window = np.where(index < self.num_tokens, self.tokens[np.minimum(index, self.num_tokens - 1)], SEPARATOR)
        lengths = np.logical_and.accumulate(window != SEPARATOR, axis=1).sum(axis=1)  # [num_matches]
        return [row[:length] for row, length in zip(window.tolist(), lengths.tolist())]

    def _suffix_range(self, query: Sequence[int]) -> tuple[int, int]:
        """Suffix-array rows [first, end) whose suffixes start with `query` (len(query) <= sort_depth)."""
        query = list(query)

        def prefix(start: int) -> list[int]:
            return self.tokens[start:start + len(query)].tolist()

        first = bisect_left(self.suffix_array, query, key=prefix)
        return first, bisect_right(self.suffix_array, query, lo=first, key=prefix)

    def save(self, path: str | Path) -> None:
        """Write one .npz (arrays + JSON header with version, fingerprint, checksum); atomic via rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "sort_depth": self.sort_depth, "num_documents": self.num_documents,
                  "sha256": _checksum(self.tokens, self.suffix_array)}
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, header=np.array(json.dumps(header)), tokens=self.tokens, suffix_array=self.suffix_array)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> TokenDatastore:
        """Read and verify a saved datastore; `fingerprint` (if given) must match the one it was built with."""
        path = check_datastore_file(path)
        header, tokens, suffix_array = _read_npz(path)
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise DatastoreError(f"{path} is datastore format {header.get('format')!r} version "
                                 f"{header.get('version')!r}, this specserve reads version {FORMAT_VERSION}; "
                                 f"{build_hint(path)}")
        if tokens.dtype != np.int32 or suffix_array.dtype != np.int32 or tokens.shape != suffix_array.shape \
                or _checksum(tokens, suffix_array) != header.get("sha256"):
            raise DatastoreError(f"{path} fails its checksum (corrupt); {build_hint(path)}")
        if fingerprint is not None and header["fingerprint"] != fingerprint:
            raise DatastoreError(f"{path} was built for another tokenizer (vocabulary {header['fingerprint'][:12]}, "
                                 f"this model's is {fingerprint[:12]}); {build_hint(path)}")
        return cls(tokens, suffix_array, int(header["sort_depth"]), header["fingerprint"],
                   int(header["num_documents"]))


def sort_suffixes(tokens: np.ndarray, depth: int) -> np.ndarray:
    """`# [num_tokens]` int32 start positions ordered by their first `depth` tokens.

    Precisely: by their first `depth` rounded up to a power of two tokens, then by position.

    Prefix doubling (Manber & Myers 1990): rank[i] orders suffix i by its first `span` tokens; the pair
    (rank[i], rank[i + span]) then orders it by its first 2 * span, so depth 16 takes four sorts.
    Past the array's end ranks 0, below SEPARATOR, so a short suffix sorts before its extensions, as in
    list comparison (which `lookup` uses to search).
    Example: tokens [3, 1, 3, 2], depth 2: suffixes (3, 1) (1, 3) (3, 2) (2) -> [1, 3, 0, 2].
    """
    num_tokens = len(tokens)
    rank = tokens.astype(np.int64) - SEPARATOR + 1  # SEPARATOR -> 1, token t -> t + 2
    order = np.argsort(rank, kind="stable")
    span = 1
    while span < depth and num_tokens > 0:
        following = np.zeros(num_tokens, np.int64)
        following[:-span] = rank[span:]
        key = rank * (int(rank.max()) + 1) + following
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        rank = np.empty(num_tokens, np.int64)
        rank[order] = np.cumsum(np.concatenate([[1], sorted_key[1:] != sorted_key[:-1]]))
        span *= 2
        if rank[order[-1]] == num_tokens:  # every suffix already distinct
            break
    return order.astype(np.int32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the vocabulary (every token string, in id order): equal for tokenizers that share ids."""
    vocab = "\n".join(tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size))
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def default_datastore_path(home: Path) -> Path:
    """Where `--spec rest` looks when no datastore is named (under `specserve_home`)."""
    return home / "datastores" / "default.npz"


def build_hint(path: Path) -> str:
    return f"build it with `specserve datastore build CORPUS.jsonl [...] --out {path} [--model MODEL]`"


def document_text(row: Any) -> str:
    """The text of one corpus row: its TEXT_FIELDS, recursively, joined by blank lines ("" if none)."""
    if isinstance(row, str):
        return row
    if isinstance(row, list):
        pieces = [document_text(item) for item in row]
    elif isinstance(row, dict):
        pieces = [document_text(row[name]) for name in TEXT_FIELDS if name in row]
    else:
        return ""
    return "\n\n".join(piece for piece in pieces if piece.strip())


def read_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of a JSONL file, in order; a malformed line is an error naming it."""
    if not path.is_file():
        raise InvalidRequestError(f"no such file: {path}")
    found = False
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InvalidRequestError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            text = document_text(row)
            if text:
                found = True
                yield text
    if not found:
        raise InvalidRequestError(f"{path}: no text found (no row has any of the fields {', '.join(TEXT_FIELDS)})")


def build_datastore_file(inputs: Sequence[str | Path], out: str | Path, model_path: str | Path,
                         max_docs: int | None = None) -> str:
    """`specserve datastore build`: read, tokenize, sort and save; returns the one-line summary."""
    if max_docs is not None and max_docs < 1:
        raise InvalidRequestError(f"--max-docs must be >= 1, got {max_docs}")
    start = time.perf_counter()
    texts: list[str] = []
    for path in map(Path, inputs):  # read every file before the slow part, so bad input fails fast
        for text in read_documents(path):
            texts.append(text)
            if len(texts) == max_docs:
                break
        if len(texts) == max_docs:
            break
    tokenizer = Tokenizer.from_gguf(model_path)
    documents = [np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)  # 4 bytes a token, not 36
                 for text in tqdm(texts, desc="tokenizing", unit="doc", disable=None)]
    datastore = TokenDatastore.from_documents(documents, tokenizer_fingerprint(tokenizer))
    datastore.save(out)
    return (f"datastore: {datastore.num_documents} documents, {datastore.num_tokens} tokens, "
            f"{time.perf_counter() - start:.1f} s -> {out}")


def _checksum(tokens: np.ndarray, suffix_array: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    digest.update(np.ascontiguousarray(suffix_array).tobytes())
    return digest.hexdigest()


def _read_npz(path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(header, tokens, suffix_array), or a one-line DatastoreError for anything unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            tokens, suffix_array = npz["tokens"], npz["suffix_array"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatastoreError(f"{path} is not a readable datastore (corrupt or truncated: {reason}); "
                             f"{build_hint(path)}") from None
    if not isinstance(header, dict):
        raise DatastoreError(f"{path} has no datastore header; {build_hint(path)}")
    return header, tokens, suffix_array

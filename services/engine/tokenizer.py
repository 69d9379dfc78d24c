"""Text <-> token ids, chat templates and streaming detokenization for one model.

Built from a GGUF's `tokenizer.*` metadata or a Hugging Face `tokenizer.json` with the `tokenizers` library;
chat templates render with jinja2 the way transformers does, so nothing here needs transformers at run time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from specserve.engine.gguf_file import read_header
from specserve.errors import InvalidRequestError, ModelLoadError

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_CONTROL = 3  # special tokens such as <|im_start|>: matched whole in text, dropped by decode(skip_special_tokens)
_USER_DEFINED = 4  # added tokens such as <think>: matched whole in text but decoded like normal text

# Chat models end a turn with one of these rather than (only) the declared EOS; like llama.cpp's
# end-of-generation set, every one the vocabulary marks special counts as a stop token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: char -> byte.
    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer | None:
    """How text is split before byte-level BPE, by llama.cpp's `tokenizer.ggml.pre` name."""
    if pre in ("default", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp splits every \p{N} off before the GPT-2 regex; SmolLM2's tokenizer.json does the same.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return None


class Tokenizer:
    """One model's tokenizer: encode/decode, chat template, stop tokens and a streaming detokenizer."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        """`bos_token`/`eos_token` are what chat templates see; `eos_token_ids` is every id that stops generation."""
        self._backend = backend
        self._chat_template = _compile_chat_template(chat_template) if chat_template else None
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self._eos_token_ids = eos_token_ids

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata (byte-level BPE only)."""
        meta = _read_gguf_tokenizer_metadata(Path(path))
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
        backend = tokenizers.Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(meta["tokenizer.ggml.pre"])
        backend.decoder = decoders.ByteLevel()
        token_types = meta.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
        )
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        _set_bos_eos_processor(
            backend,
            bos_id if meta.get("tokenizer.ggml.add_bos_token") else None,
            eos_id if meta.get("tokenizer.ggml.add_eos_token") else None,
        )
        declared = [i for i in (eos_id, meta.get("tokenizer.ggml.eot_token_id")) if i is not None]
        return cls(
            backend,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=tokens[bos_id] if bos_id is not None else None,
            eos_token=tokens[eos_id] if eos_id is not None else None,
            eos_token_ids=_stop_token_ids(backend, declared),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face model directory's `tokenizer.json` (+ tokenizer_config / generation_config)."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise ModelLoadError(f"{root} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ModelLoadError(f"cannot read {root / 'tokenizer.json'}: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        eos_token = _token_content(config.get("eos_token"))
        return cls(
            backend,
            chat_template=_hf_chat_template(root, config),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=eos_token,
            eos_token_ids=_stop_token_ids(backend, _hf_eos_ids(root, backend, eos_token)),
        )

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation; the model's declared EOS comes first."""
        return self._eos_token_ids

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): a byte-level BPE token may hold part of
        a UTF-8 character, which its decoded text alone cannot show. Added tokens: their text."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise InvalidRequestError(f"token id {token_id} is outside the vocabulary")
        if isinstance(self._backend.decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHAR for c in token):
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        return self._backend.decode([token_id], skip_special_tokens=False).encode()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added only where the model asks for them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` as the model's chat template renders it."""
        if self._chat_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template rejected the messages: {exc}") from exc

    def render_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids ending in a generation prompt; equals transformers' `apply_chat_template(tokenize=True)`."""
        # The template writes any BOS itself, so the encoder must not add another.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)

    def stream(self, skip_special_tokens: bool = True) -> DetokenizeStream:
        return DetokenizeStream(self._backend, skip_special_tokens=skip_special_tokens)


class DetokenizeStream:
    """Turns token ids arriving a few at a time into text, holding back incomplete UTF-8 characters.

    Concatenating every `step` and then `finish` gives exactly `Tokenizer.decode(all ids)`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted_chars = 0

    def step(self, ids: int | Iterable[int]) -> str:
        """The text completed by `ids` (one id, or several accepted at once); "" while a character is unfinished."""
        # Plain ints: callers hand over numpy / torch scalars straight from the sampler.
        ids = [int(ids)] if isinstance(ids, Integral) else [int(i) for i in ids]
        self._ids.extend(ids)
        text = self._stream.step(self._backend, ids) or ""
        self._emitted_chars += len(text)
        return text

    def finish(self) -> str:
        """Whatever was held back when the sequence ends; an unfinished character decodes to U+FFFD."""
        full = self._backend.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        return full[self._emitted_chars :]


def _read_gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    try:
        header = read_header(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF {path}: {exc}") from exc
    meta = {name: value for name, value in header.metadata.items() if name.startswith("tokenizer.")}
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError(f"{path} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model != "gpt2":
        raise ModelLoadError(f"{path}: unsupported tokenizer.ggml.model {model!r}; only byte-level BPE ('gpt2') is")
    if "tokenizer.ggml.merges" not in meta:
        raise ModelLoadError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    pre = meta.setdefault("tokenizer.ggml.pre", "default")
    if _byte_level_pre_tokenizer(pre) is None:
        raise ModelLoadError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}; supported: default, gpt2, smollm")
    return meta


def _set_bos_eos_processor(backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None) -> None:
    """Make `encode(add_special_tokens=True)` wrap text in BOS/EOS; a no-op when neither is wanted."""
    if bos_id is None and eos_id is None:
        return
    bos = [backend.id_to_token(bos_id)] if bos_id is not None else []
    eos = [backend.id_to_token(eos_id)] if eos_id is not None else []
    backend.post_processor = TemplateProcessing(
        single=[*bos, "$A", *eos], special_tokens=[(token, backend.token_to_id(token)) for token in bos + eos]
    )


def _stop_token_ids(backend: tokenizers.Tokenizer, declared: Sequence[int]) -> tuple[int, ...]:
    """The declared EOS ids, then any known end-of-turn token the vocabulary marks special."""
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    turn_ends = [backend.token_to_id(t) for t in _END_OF_TURN_TOKENS if t in special]
    return tuple(dict.fromkeys([*declared, *turn_ends]))


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses (templates are untrusted)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own `tojson` escapes HTML characters, which would change tool schemas inside prompts.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as a serialized AddedToken."""
    return token.get("content") if isinstance(token, dict) else token


def _hf_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    """Newer repos keep the template in `chat_template.jinja`; older ones inline one or several in the config."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def _hf_eos_ids(root: Path, backend: tokenizers.Tokenizer, eos_token: str | None) -> list[int]:
    """EOS ids by how much generation is meant to honour them: generation_config, then config, then tokenizer."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(root / name).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    return [eos_id] if eos_id is not None else []

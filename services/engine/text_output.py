"""Per-request text assembly: incremental detokenization and stop strings.

Text is streamed as it becomes final. When stop strings are set, the last `max(len(stop)) - 1` characters
are held back until they can no longer begin a stop string, so a client never sees text that a stop
string later cuts off.
"""

from __future__ import annotations

from collections.abc import Container

from specserve.engine.sequence import FinishReason, Sequence
from specserve.engine.tokenizer import Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._detok = tokenizer.stream()
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (up to a stop string, once one is hit)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` (and truncates) when a stop string appears."""
        assert not self.stopped
        self._add(self._detok.step(token_id))

    def flush(self) -> None:
        """The sequence ended: decode whatever the detokenizer still held back."""
        if not self.stopped:
            self._add(self._detok.finish())

    def _add(self, piece: str) -> None:
        if not piece:
            return
        # A stop string may straddle the old text and the new piece.
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        for stop in self._stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                search_from = min(search_from, at)

    def take_delta(self, final: bool) -> str:
        """Text that is now certain and not yet handed out; everything left when `final`."""
        end = len(self.text) if (final or self.stopped) else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta


def append_tokens(seq: Sequence, text: TextOutput, token_ids: list[int], eos_token_ids: Container[int]) -> list[int]:
    """Append one step's tokens to `seq` one by one, stopping at the first that finishes it (EOS, a stop
    token, a stop string, max_tokens, the context). Returns the tokens appended; `seq` is finished (with
    its reason) when one of them ended it. The text of every appended token except EOS goes to `text`."""
    params = seq.params
    appended = []
    for token_id in token_ids:
        seq.append_token(token_id)
        appended.append(token_id)
        is_eos = token_id in eos_token_ids and not params.ignore_eos
        if not is_eos:
            text.push(token_id)
        if is_eos or token_id in params.stop_token_ids or text.stopped:
            seq.finish(FinishReason.STOP)
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            seq.finish(FinishReason.LENGTH)
        if seq.is_finished:
            break
    if seq.is_finished:
        text.flush()
    return appended

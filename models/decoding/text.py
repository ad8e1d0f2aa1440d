"""Token ids to text as they are produced: incremental decoding and stop strings.

Decoding the ids generated so far and emitting what is new is exact for any tokenizer (byte
level BPE merges, SentencePiece's leading spaces) where decoding token by token is not; text
ending in an incomplete UTF-8 character (``\\ufffd``) waits for the next token. A stop string
ends the text before it; while the text's tail could still become a stop string, that tail is
held back, so a streamed answer never shows part of a stop string.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self.emitted = ""  # text handed out so far
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one generated token; return the text that may be shown now ("" if none)."""
        self._ids.append(token)
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        if self._stop:
            start = max(0, len(self.emitted) - max(len(s) for s in self._stop))
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(text[: min(hits)])
            text = text[: len(text) - self._held(text)]
        return self._emit(text)

    def flush(self) -> str:
        """The text held back for a possible stop string, once generation ended without one."""
        if self.stopped:
            return ""
        text = self._tok.decode(self._ids, skip_special_tokens=True).rstrip("\ufffd")
        return self._emit(text)

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

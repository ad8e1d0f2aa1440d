"""Token ids to text as they are produced: incremental decoding and stop strings.

Each token decodes a short window (vLLM's prefix and read offsets): the text of the window with
the new token less the text of the window without it. That is exact for any tokenizer (byte
level BPE merges, SentencePiece's leading spaces) where decoding token by token is not, and
costs the same at the 500th token as at the first (decoding every generated id again would
not); text ending in an incomplete UTF-8 character (``\\ufffd``) waits for the next token. The
tokenizer's Rust backend decodes when it has one (what a fast tokenizer's ``decode`` calls). A stop string
ends the text before it; while the text's tail could still become a stop string, that tail is
held back, so a streamed answer never shows part of a stop string.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._fast = getattr(tokenizer, "backend_tokenizer", None)
        self._stop = stop
        self._ids: list[int] = []
        self._prefix = 0  # the window decodes ids[prefix:]; ids[prefix:read] is already text
        self._read = 0
        self.text = ""  # everything decoded so far
        self.emitted = ""  # text handed out so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    def _tail(self) -> str:
        """Text the tokens after ``read`` add (it may end in an incomplete character)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token: int) -> str:
        """Append one generated token; return the text that may be shown now ("" if none)."""
        self._ids.append(token)
        new = self._tail()
        if not new or new.endswith("\ufffd"):
            return ""
        self.text += new
        self._prefix, self._read = self._read, len(self._ids)
        text = self.text
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
        return self._emit(self.text + self._tail().rstrip("\ufffd"))

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

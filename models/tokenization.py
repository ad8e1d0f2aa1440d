"""Turn request inputs (strings or token-id arrays) into model token ids, with the limits.

Token-id arrays follow the OpenAI convention of "tokens of the text": ids from this model's own
vocabulary *without* special tokens (what ``tokenizer.encode(text, add_special_tokens=False)``
returns). The encoder adds the model's special tokens, so ``[ids of "hi"]`` and ``"hi"`` give the
same result.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from models.errors import InputTooLong, InvalidRequest

Input = str | Sequence[int]


class InputEncoder:
    """Wraps a Hugging Face fast tokenizer with the service's limits.

    Texts go straight to the Rust ``tokenizers`` backend without special tokens, then get the
    model's special tokens from ``build_inputs_with_special_tokens``: the same ids as
    ``tokenizer(text, truncation=...)`` (tested), at a fraction of the Python overhead, which
    matters because this runs on the replica's event loop for every request.
    """

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._n_special = len(tokenizer.build_inputs_with_special_tokens([]))
        self._prefix, self._suffix = _single_template(tokenizer)
        self._rust = copy.deepcopy(tokenizer.backend_tokenizer)
        self._rust.no_truncation()
        self._rust.no_padding()

    def encode(self, inputs: Sequence[Input], *, truncate: bool = False) -> list[list[int]]:
        """Token ids with special tokens, one list per input; raises on invalid or long input."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        out: list[list[int] | None] = [None] * len(inputs)
        if texts:
            for i, text in texts:
                _check_text(text, i)
            for i, text in texts:  # encode, not encode_batch: no rayon threads on the hot path
                out[i] = self._with_specials(self._rust.encode(text, add_special_tokens=False).ids, truncate)
        for i, x in enumerate(inputs):
            if out[i] is None:
                out[i] = self._from_ids(x, i, truncate)
        for i, ids in enumerate(out):
            if len(ids) > self.max_tokens:
                raise InputTooLong(
                    f"input {i} has {len(ids)} tokens; the limit is {self.max_tokens} "
                    "(send `truncate: true` to cut it instead)",
                    param="input",
                )
        return out  # type: ignore[return-value]

    def _from_ids(self, ids: Sequence[int], index: int, truncate: bool) -> list[int]:
        if len(ids) == 0:
            raise InvalidRequest(f"input {index} is an empty token array", param="input")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(
                    f"input {index} has token id {t!r} outside this model's vocabulary "
                    f"[0, {self.vocab_size})",
                    param="input",
                )
        return self._with_specials(list(ids), truncate)

    def _with_specials(self, body: list[int], truncate: bool) -> list[int]:
        if truncate:
            body = body[: max(self.max_tokens - self._n_special, 0)]
        if self._prefix is None:
            return self.tokenizer.build_inputs_with_special_tokens(body)
        return self._prefix + body + self._suffix


def _single_template(tokenizer) -> tuple[list[int] | None, list[int]]:
    """The special tokens a single sequence gets, as (before, after), when the tokenizer's
    ``build_inputs_with_special_tokens`` is that concatenation (BERT's ``[CLS] x [SEP]``, and
    no specials at all); (None, []) otherwise, and the tokenizer's method is called per input."""
    probe = [-7, -8]
    built = tokenizer.build_inputs_with_special_tokens(list(probe))
    for i in range(len(built) - 1):
        if built[i : i + 2] == probe:
            before, after = built[:i], built[i + 2 :]
            if tokenizer.build_inputs_with_special_tokens([-9]) == before + [-9] + after:
                return before, after
    return None, []


def _check_text(text: str, index: int) -> None:
    if not text:
        raise InvalidRequest(f"input {index} is an empty string", param="input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"input {index} is not valid Unicode (lone surrogate at position {exc.start})",
            param="input",
        ) from None

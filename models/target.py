"""The `model` string grammar: ``BASE``, ``ADAPTER`` or ``BASE:ADAPTER``, each optionally
followed by ``@VARIANT``. One parser, one formatter; the result is a frozen ``Target``.

A lone name is ambiguous (a base or an adapter); the ``Target`` keeps it in ``head`` and the
catalog decides when it resolves the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import InvalidRequest, VariantNotFound
from models.spec import NAME_RE, VARIANT_NAMES

MAX_MODEL_STRING = 300


@dataclass(frozen=True)
class Target:
    """Parsed `model` string. ``head`` is the base (or, when alone, possibly an adapter)."""

    head: str
    adapter: str | None = None
    variant: str | None = None

    @classmethod
    def parse(cls, text: object) -> Target:
        if not isinstance(text, str) or not text:
            raise InvalidRequest("`model` must be a non-empty string", param="model")
        if len(text) > MAX_MODEL_STRING:
            raise InvalidRequest(
                f"`model` is {len(text)} characters; the limit is {MAX_MODEL_STRING}",
                param="model",
            )
        name, sep, variant = text.partition("@")
        if sep and variant not in VARIANT_NAMES:
            raise VariantNotFound(
                f"unknown variant {variant!r} in model {text!r}; "
                f"variants are {', '.join(VARIANT_NAMES)}",
                param="model",
            )
        head, sep2, adapter = name.partition(":")
        parts = [head] + ([adapter] if sep2 else [])
        for part in parts:
            if not NAME_RE.match(part):
                raise InvalidRequest(
                    f"malformed model string {text!r}: expected BASE, ADAPTER or BASE:ADAPTER, "
                    "optionally followed by @VARIANT",
                    param="model",
                )
        return cls(head=head, adapter=adapter if sep2 else None, variant=variant if sep else None)

    def format(self) -> str:
        text = self.head if self.adapter is None else f"{self.head}:{self.adapter}"
        return text if self.variant is None else f"{text}@{self.variant}"

    def __str__(self) -> str:
        return self.format()

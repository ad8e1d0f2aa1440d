"""Prometheus text format: the one scraper and parser of the service's metrics endpoint.

``parse(text)`` turns the exposition format (``name{label="value",...} value [timestamp]``,
``#`` comment lines, escaped label values, ``+Inf``/``NaN``) into ``Sample`` tuples;
``total`` sums the samples of one name whose labels match, ``buckets`` gathers a histogram's
cumulative ``_bucket`` counts by ``le`` and ``bucket_quantile`` reads a quantile of the
observations made between two scrapes (as the upper bound of the bucket holding it).
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from typing import NamedTuple


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _labels(text: str, i: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at ``text[i] == "{"``; return (labels, index after ``}``)."""
    labels: dict[str, str] = {}
    i += 1
    while True:
        while i < len(text) and text[i] in " ,":
            i += 1
        if text[i] == "}":
            return labels, i + 1
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = text.index('"', eq) + 1
        value = []
        while text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                value.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
            else:
                value.append(text[i])
                i += 1
        labels[key] = "".join(value)
        i += 1


def _value(token: str) -> float:
    low = token.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    return float(token)  # "NaN" parses too


def parse(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition; malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name = line[:brace]
                labels, end = _labels(line, brace)
                rest = line[end:].split()
            else:
                name, labels, rest = line[:space], {}, line[space:].split()
            out.append(Sample(name, labels, _value(rest[0])))
        except (ValueError, IndexError):
            continue
    return out


def scrape(url: str, timeout_s: float = 10.0) -> list[Sample]:
    """Samples of ``url`` (e.g. ``http://127.0.0.1:PORT/metrics``); [] when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return parse(r.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError):
        return []


def _match(sample: Sample, want: dict[str, str]) -> bool:
    return all(sample.labels.get(k) == v for k, v in want.items())


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels`` (e.g. over replicas)."""
    return sum(s.value for s in samples if s.name == name and _match(s, labels))


def buckets(samples: list[Sample], name: str, **labels: str) -> dict[float, float]:
    """Cumulative counts of histogram ``name`` by upper bound ``le``, summed over series."""
    out: dict[float, float] = {}
    for s in samples:
        if s.name == name + "_bucket" and "le" in s.labels and _match(s, labels):
            le = _value(s.labels["le"])
            out[le] = out.get(le, 0.0) + s.value
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket that holds quantile ``q`` of the observations made between two
    scrapes of one histogram; None when there were none."""
    bounds = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in bounds]  # still cumulative
    if not counts or counts[-1] <= 0:
        return None
    want = counts[-1] * q
    return next(le for le, c in zip(bounds, counts) if c >= want)

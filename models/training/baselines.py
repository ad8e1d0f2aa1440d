"""Baselines a trained classifier is reported beside, on the same held-out sentences.

- ``majority``: every row gets the most frequent training label (``evaluation.majority``).
- ``vader``: the lexicon-based analyzer of Hutto and Gilbert (``vaderSentiment`` on PyPI), for
  a ``negative``/``positive`` task: the sign of its compound score (0 counts as positive, as the
  authors' own threshold of >= 0.05 for positive and <= -0.05 for negative leaves no third class
  here). It was built on the same kind of human ratings as the snippets corpora.
"""

from __future__ import annotations

from collections.abc import Callable

BINARY = {"negative", "positive"}


def vader(labels: list[str]) -> Callable[[list[str]], list[str]]:
    if set(labels) != BINARY:
        raise ValueError(f"the vader baseline needs the labels {sorted(BINARY)}, not {labels}")
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ValueError("the vader baseline needs the vaderSentiment package (pip install vaderSentiment)") from None
    analyzer = SentimentIntensityAnalyzer()

    def predict(texts: list[str]) -> list[str]:
        return ["positive" if analyzer.polarity_scores(t)["compound"] >= 0 else "negative" for t in texts]

    return predict


BASELINES = {"vader": vader}


def baseline(name: str, labels: list[str]) -> Callable[[list[str]], list[str]]:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    return BASELINES[name](labels)

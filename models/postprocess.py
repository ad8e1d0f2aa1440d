"""Small numeric steps applied to backend outputs before they are encoded for the wire."""

from __future__ import annotations

import numpy as np


def shorten_embeddings(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Keep the first ``dimensions`` components (OpenAI's `dimensions`) and re-normalize.

    ``vectors`` is ``[rows, hidden]``; ``dimensions`` is already validated to 1..hidden.
    """
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]  # [rows, dimensions]
    if normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)
    return cut.astype(np.float32, copy=False)

"""Linear weights stored column-major for the CPU's matrix kernels (both torch backends).

``F.linear`` computes ``x @ W.T``. With ``W`` row-major, MKL's sgemm repacks the whole weight on
every call, which for the dozen token rows of a one-sentence request (or the 32 rows of a decode
pass) is most of the matmul: a py-spy profile of an encoder replica showed it in ``sgemm_scopy``.
With ``W.T`` contiguous it does not; the values and the ``[out, in]`` shape stay, outputs are
bit-identical. Measured: the one-sentence latency of the torch encoder in
``loadtest/results/variants.md``. On the default generative base the gain per decode pass was
small (a few percent, ad hoc, not in a committed run).
"""

from __future__ import annotations

import torch


def column_major_linear_weights(module: torch.nn.Module) -> None:
    """Store each ``Linear`` weight of ``module`` column-major, in place (tied weights follow:
    an embedding that shares the head's weight reads the same values through the new strides)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()

"""Sample generators shared by the primitive tests: index maps, strided views, dtypes."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances of one rounding to the output dtype (inputs are exact in every dtype here).
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def random_map(rng: np.random.Generator, n_slots: int, n_source: int, pad_fraction: float = 0.3) -> np.ndarray:
    """A valid index map: n_slots entries, distinct sources in [0, n_source), the rest -1."""
    m = np.full(n_slots, -1, dtype=np.int64)
    n_take = min(n_slots, n_source)
    if n_slots > n_source:
        slots = rng.choice(n_slots, size=n_take, replace=False)
    else:
        slots = np.arange(n_slots)
        # drop a few slots to padding even when sources are plentiful
        slots = slots[rng.random(n_slots) >= pad_fraction * 0.5] if n_slots else slots
    m[slots] = rng.choice(n_source, size=len(slots), replace=False)
    return m


@st.composite
def index_maps(draw, n_slots: int, n_source: int):
    """Hypothesis strategy for index maps of n_slots entries over n_source units."""
    perm = draw(st.permutations(list(range(n_source))))
    pad = draw(st.lists(st.booleans(), min_size=n_slots, max_size=n_slots))
    m = np.full(n_slots, -1, dtype=np.int64)
    it = iter(perm)
    for i in range(n_slots):
        if not pad[i]:
            nxt = next(it, None)
            if nxt is None:
                break
            m[i] = nxt
    return m


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t in another memory layout: contiguous, transposed storage, or sliced."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed" and t.ndim >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":
        big = torch.zeros(*[2 * s + 1 for s in t.shape], dtype=t.dtype)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    return t


LAYOUTS = ["contiguous", "transposed", "sliced"]


def randn(shape, dtype, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

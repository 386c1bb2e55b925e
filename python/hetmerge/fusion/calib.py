"""Calibration inputs of hm.fuse, and which of each model's token positions pair with which.

Two forms:

- token ids [B, T] that every model shares (same vocabulary): row n of every model's activations is
  the same position of the same sequence (`shared_plans`).
- TEXT, which each model encodes with its own tokenizer (`text_plans`). Tokens of two tokenizers
  rarely coincide, but character positions do. A common boundary is a character offset at which a
  token ends in every tokenization; consecutive common boundaries cut the text into spans, and each
  span holds one or more whole tokens of every model. One activation row per span and model:
  "last" (default) takes the span's last token — in a causal LM the state there has read exactly
  text[:boundary], the same text for every model; "mean" averages the span's tokens.
  Example, "the cat": a character tokenizer ends tokens at 1..7, a word tokenizer at 3 and 7;
  the spans are (0, 3] and (3, 7]; the character model's rows are its positions 2 and 6 ("e", "t"),
  the word model's its positions 0 and 1 ("the", "cat").

Each model reads the text in chunks of at most `length` tokens that start and end on common
boundaries, so that all models read the same characters in each forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .topology import FusionError

__all__ = ["Plan", "shared_plans", "text_plans", "encode", "common_spans", "POOLS"]

POOLS = ("last", "mean")


@dataclass
class Plan:
    """One model's calibration: batches of ids to run, and how its positions become paired rows.

    batches: [ids [b, T]] run in order (positions flattened batch by batch: P in all);
    span: [P] int64, the paired row of each position, -1 = unused; n_rows: N rows;
    pool: "last" (the largest position of each row) or "mean"."""
    batches: list
    span: torch.Tensor | None
    n_rows: int
    pool: str = "last"

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x: [P, d] activations of every position -> [N, d] paired rows."""
        if self.span is None:
            return x
        keep = self.span >= 0
        idx, xs = self.span[keep], x[keep]
        if self.pool == "mean":
            out = torch.zeros(self.n_rows, x.shape[1], dtype=x.dtype).index_add_(0, idx, xs)
            count = torch.bincount(idx, minlength=self.n_rows).to(x.dtype)
            return out / count[:, None]
        pos = torch.arange(len(self.span))[keep]
        last = torch.full((self.n_rows,), -1, dtype=torch.long).scatter_reduce_(0, idx, pos, "amax")
        return x[last]


def shared_plans(calib, models: list[tuple[str, nn.Module]], batch: int = 8) -> list[Plan]:
    """Token ids [B, T] (or [T]) checked against every model's vocabulary -> one Plan per model."""
    ids = torch.as_tensor(calib)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise FusionError(f"fuse: calib must be integer token ids [batch, length] or text, got {tuple(ids.shape)} "
                          f"{ids.dtype}")
    ids = ids.long()
    for what, m in models:
        _check_vocab(ids, what, m)
    batches = [ids[i:i + batch] for i in range(0, ids.shape[0], batch)]
    return [Plan(batches, None, ids.numel()) for _ in models]


def _check_vocab(ids: torch.Tensor, what: str, m: nn.Module) -> None:
    vocab = m.get_input_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise FusionError(f"fuse: calib ids span {int(ids.min())}..{int(ids.max())} but the {what}'s "
                          f"vocabulary has {vocab} tokens")


def encode(tokenizer, text: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n] int64, ends [n] int64): the tokens of `text` and the character offset where each ends,
    from a `tokenizers.Tokenizer`, a transformers fast tokenizer, or a callable text -> (ids, ends)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:   # without the tokenizers package only a callable can be given
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        enc = tokenizer.encode(text, add_special_tokens=False)
        ids, ends = enc.ids, [e for _, e in enc.offsets]
    elif callable(tokenizer) and hasattr(tokenizer, "is_fast"):                    # transformers
        if not tokenizer.is_fast:
            raise FusionError(f"fuse: the {what}'s tokenizer is a slow (Python) tokenizer: character offsets "
                              "need a fast one (tokenizers backend)")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = enc["input_ids"], [e for _, e in enc["offset_mapping"]]
    elif callable(tokenizer):
        ids, ends = tokenizer(text)
    else:
        raise FusionError(f"fuse: the {what}'s tokenizer must be a tokenizers.Tokenizer, a transformers fast "
                          f"tokenizer or a callable text -> (ids, ends), got {type(tokenizer).__name__}")
    ids, ends = torch.as_tensor(ids, dtype=torch.long).reshape(-1), torch.as_tensor(ends, dtype=torch.long).reshape(-1)
    if len(ids) != len(ends):
        raise FusionError(f"fuse: the {what}'s tokenizer gave {len(ids)} ids but {len(ends)} offsets")
    if len(ends) > 1 and bool((ends[1:] < ends[:-1]).any()):
        k = int((ends[1:] < ends[:-1]).nonzero()[0]) + 1
        raise FusionError(f"fuse: the {what}'s tokenizer gives token ends that go backwards (token {k} ends at "
                          f"{int(ends[k])} after {int(ends[k - 1])}): cannot pair by character spans")
    return ids, ends


def common_spans(ends: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(bounds [S] the common boundaries, ascending; [span [n_m]] per model: the span of each token,
    span k = (bounds[k-1], bounds[k]], -1 for tokens after the last common boundary)."""
    common = torch.unique(ends[0])
    for e in ends[1:]:
        common = common[torch.isin(common, e)]
    common = common[common > 0]     # a token ending at 0 (empty, at the start) covers no character
    spans = []
    for e in ends:
        k = torch.searchsorted(common, e)          # first bound >= end: the span that holds this token
        spans.append(torch.where(k < len(common), k, torch.full_like(k, -1)))
    return common, spans


def text_plans(text: str, tokenizers: list, models: list[tuple[str, nn.Module]], length: int,
               pool: str = "last") -> list[Plan]:
    """One Plan per model for calibration TEXT read by each model's own tokenizer; rows paired by
    common character spans (module docstring), chunks of at most `length` tokens per model."""
    if pool not in POOLS:
        raise FusionError(f"fuse: calib_pool must be one of {POOLS}, got {pool!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise FusionError(f"fuse: calib_length must be a positive int, got {length!r}")
    if not text:
        raise FusionError("fuse: calib text is empty")
    enc = [encode(tok, text, what) for tok, (what, _) in zip(tokenizers, models)]
    for (ids, _), (what, m) in zip(enc, models):
        if len(ids):
            _check_vocab(ids, what, m)
    bounds, spans = common_spans([e for _, e in enc])
    if len(bounds) == 0:
        raise FusionError("fuse: the calib text has no character offset where every model's tokens end")
    # tokens per span and model; chunks: runs of whole spans with at most `length` tokens in every model
    counts = torch.stack([torch.bincount(s[s >= 0], minlength=len(bounds)) for s in spans])   # [M, S]
    chunks, start, used = [], 0, torch.zeros(len(models), dtype=torch.long)
    for k in range(len(bounds)):
        if bool((counts[:, k] > length).any()):       # one span too long for a window: skip it
            if k > start:
                chunks.append((start, k))
            start, used = k + 1, torch.zeros_like(used)
            continue
        if bool((used + counts[:, k] > length).any()):
            chunks.append((start, k))
            start, used = k, torch.zeros_like(used)
        used += counts[:, k]
    if len(bounds) > start:
        chunks.append((start, len(bounds)))
    if not chunks:
        raise FusionError(f"fuse: no span of the calib text fits in calib_length = {length} tokens of every model")
    row_of = torch.full((len(bounds),), -1, dtype=torch.long)      # skipped spans get no row
    n = 0
    for a, b in chunks:
        row_of[a:b] = torch.arange(n, n + b - a)
        n += b - a
    plans = []
    for (ids, _), span in zip(enc, spans):
        batches, rows = [], []
        for a, b in chunks:
            sel = (span >= a) & (span < b)
            batches.append(ids[sel][None])
            rows.append(row_of[span[sel]])
        plans.append(Plan(batches, torch.cat(rows), n, pool))
    return plans

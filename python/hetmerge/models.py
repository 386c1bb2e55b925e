"""Small model builders (MLP, CNN, residual MLP/CNN) and a fast seeded trainer, for tests, the demo
and the CLI. Layer names are stable (fc0, fc1, ..., head) so layer maps read naturally."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["mlp", "cnn", "res_mlp", "res_cnn", "train", "accuracy"]


def mlp(in_dim: int, widths: Sequence[int], out_dim: int, bn: bool = False,
        dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU stack: in_dim -> widths[0] -> ... -> out_dim (depth = len(widths) + 1 layers)."""
    mods: list[tuple[str, nn.Module]] = []
    d = in_dim
    for i, w in enumerate(widths):
        mods.append((f"fc{i}", nn.Linear(d, w)))
        if bn:
            mods.append((f"bn{i}", nn.BatchNorm1d(w)))
        mods.append((f"act{i}", nn.ReLU()))
        if dropout:
            mods.append((f"drop{i}", nn.Dropout(dropout)))
        d = w
    mods.append(("head", nn.Linear(d, out_dim)))
    return nn.Sequential(OrderedDict(mods))


def cnn(in_ch: int, channels: Sequence[int], out_dim: int, spatial: Sequence[int],
        bn: bool = True, hidden: int | None = None) -> nn.Sequential:
    """Conv(3, padding 1)-BN-ReLU stack on inputs [N, in_ch, *spatial] (1-D or 2-D), then flatten
    and a Linear head (optionally through one hidden Linear of width `hidden`)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(spatial)]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(spatial)]
    mods: list[tuple[str, nn.Module]] = []
    c = in_ch
    for i, ch in enumerate(channels):
        mods.append((f"conv{i}", conv(c, ch, 3, padding=1)))
        if bn:
            mods.append((f"bn{i}", norm(ch)))
        mods.append((f"act{i}", nn.ReLU()))
        c = ch
    mods.append(("flatten", nn.Flatten()))
    n = c
    for s in spatial:
        n *= s
    if hidden:
        mods += [("fc", nn.Linear(n, hidden)), ("fc_act", nn.ReLU())]
        n = hidden
    mods.append(("head", nn.Linear(n, out_dim)))
    return nn.Sequential(OrderedDict(mods))


class _ResMLP(nn.Module):
    def __init__(self, in_dim, width, blocks, out_dim, hidden):
        super().__init__()
        self.stem = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden or width), nn.ReLU(), nn.Linear(hidden or width, width))
            for _ in range(blocks))
        self.head = nn.Linear(width, out_dim)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for b in self.blocks:
            h = h + b(h)
        return self.head(F.relu(h))


def res_mlp(in_dim: int, width: int, blocks: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """Residual MLP: stem, `blocks` × (h + Linear-ReLU-Linear(h)), head. The residual stream is one
    permutation group; each block's inner width (`hidden`) is another."""
    return _ResMLP(in_dim, width, blocks, out_dim, hidden)


class _ResCNN(nn.Module):
    def __init__(self, in_ch, width, blocks, out_dim):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
            for _ in range(blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x):
        h = F.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            h = F.relu(h + b(h))
        return self.head(torch.flatten(self.pool(h), 1))


def res_cnn(in_ch: int, width: int, blocks: int, out_dim: int) -> nn.Module:
    """Residual CNN: conv stem + BN, `blocks` × relu(h + conv-BN-ReLU-conv-BN(h)), global average
    pool, Linear head."""
    return _ResCNN(in_ch, width, blocks, out_dim)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int = 30, lr: float = 3e-3,
          batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, minibatches shuffled with `seed`; returns the model in eval mode.
    Trains in place (it is the model's own training, not a merge) and seeds torch for init-free
    reproducibility of dropout."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = len(y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue   # BatchNorm needs two samples
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(X).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc

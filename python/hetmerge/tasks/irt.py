"""Item response theory for cheap evaluation (MERGE3's estimator): predict a model's accuracy on a
whole data set from its answers on a few items.

    2PL model   P(model m answers item j correctly) = σ(a_j (θ_m − b_j)); θ_m the model's ability,
                b_j the item's difficulty, a_j > 0 its discrimination
    fit_2pl     MAP fit of (θ, a, b) to a response matrix of reference models × all items (Adam, full
                batch; N(0, 1) priors on θ and b and a log-normal prior on a keep items that every
                reference model gets right, or wrong, finite)
    select      per group (task), items spread over the difficulty range (evenly spaced quantiles of
                b): a small subset that still sees easy and hard items
    estimate    a new model answers only the subset; its ability is the MAP θ given those answers, and
                its accuracy per group is (correct answers on the subset + Σ P_j(θ) over the items it
                did not answer) / items in the group (the answered items count as observed; the others
                as predicted, the gp-IRT combination)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ItemModel", "fit_2pl", "select_items", "ability", "estimate_accuracy"]


@dataclass
class ItemModel:
    a: torch.Tensor     # [N] discrimination (> 0)
    b: torch.Tensor     # [N] difficulty

    def p(self, theta: torch.Tensor) -> torch.Tensor:
        """[..., N] probability of a correct answer for abilities theta [...]."""
        return torch.sigmoid(self.a * (theta.unsqueeze(-1) - self.b))


def fit_2pl(responses: torch.Tensor, steps: int = 400, lr: float = 0.05) -> tuple[ItemModel, torch.Tensor]:
    """(items, abilities [M]) fitted to responses [M models, N items] (1 = correct)."""
    R = torch.as_tensor(responses, dtype=torch.float32)
    if R.dim() != 2 or R.shape[0] < 2 or R.shape[1] < 1:
        raise ValueError(f"responses: expected [models >= 2, items >= 1], got shape {tuple(R.shape)}")
    M, N = R.shape
    theta = torch.zeros(M, requires_grad=True)
    log_a = torch.zeros(N, requires_grad=True)
    b = torch.zeros(N, requires_grad=True)
    opt = torch.optim.Adam([theta, log_a, b], lr=lr)
    for _ in range(steps):
        logits = log_a.exp() * (theta[:, None] - b)
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, R, reduction="sum")
        prior = 0.5 * (theta.square().sum() + b.square().sum() + (log_a / 0.5).square().sum())
        loss = (nll + prior) / (M * N)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ItemModel(log_a.detach().exp(), b.detach()), theta.detach()


def select_items(items: ItemModel, groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Indices of up to `per_group` items per group, at evenly spaced quantiles of difficulty."""
    groups = torch.as_tensor(groups)
    if per_group < 1:
        raise ValueError(f"items: need at least 1 item per task, got {per_group}")
    out = []
    for g in groups.unique(sorted=True).tolist():
        idx = torch.nonzero(groups == g)[:, 0]
        order = idx[torch.argsort(items.b[idx])]
        k = min(per_group, len(order))
        pos = torch.linspace(0, len(order) - 1, k).round().long()
        out.append(order[pos.unique()])
    return torch.cat(out)


_GRID = torch.linspace(-6, 6, 481)


def ability(items: ItemModel, subset: torch.Tensor, answers: torch.Tensor) -> float:
    """MAP ability (N(0, 1) prior) given answers [k] to the items `subset` [k], on a fine grid."""
    a, b = items.a[subset], items.b[subset]
    r = torch.as_tensor(answers, dtype=torch.float32)
    logits = a * (_GRID[:, None] - b)                                   # [grid, k]
    ll = -torch.nn.functional.binary_cross_entropy_with_logits(logits, r.expand_as(logits), reduction="none").sum(1)
    return float(_GRID[torch.argmax(ll - 0.5 * _GRID.square())])


def estimate_accuracy(items: ItemModel, groups: torch.Tensor, subset: torch.Tensor,
                      answers: torch.Tensor) -> torch.Tensor:
    """[G] estimated accuracy per group (sorted group ids) of a model that answered only `subset`."""
    groups = torch.as_tensor(groups)
    theta = torch.tensor(ability(items, subset, answers))
    per_item = items.p(theta).clone()
    per_item[subset] = torch.as_tensor(answers, dtype=per_item.dtype)
    return torch.stack([per_item[groups == g].mean() for g in groups.unique(sorted=True).tolist()])

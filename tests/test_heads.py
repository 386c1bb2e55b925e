"""Attention heads in alignments (hetmerge.heads): the structured head solve against brute force,
position maps and the structure check, and the softmax-scale fold that lets heads of another size be
zero-padded exactly."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge.alignment import Alignment, AlignmentError
from hetmerge.heads import TieLink, is_structured, random_perms, solve_tie, tie_position_maps
from hetmerge.maps import permute_state
from hetmerge.spec import PermSpec, SpecError, Tie


def _brute_force(tie: TieLink, costs) -> float:
    """Best total over every structured map, by enumeration (independent of the solver)."""
    Ha, Hb = tie.heads_a, tie.heads_b
    best = -math.inf
    for heads in itertools.permutations(list(range(Hb)) + [-1] * max(0, Ha - Hb), Ha):
        if len(set(h for h in heads if h >= 0)) != sum(h >= 0 for h in heads):
            continue
        total = 0.0
        for ln, ua, ub in zip(tie.links, tie.units_a, tie.units_b):
            C = costs[ln].reshape(Ha, ua, Hb, ub)
            for i, j in enumerate(heads):
                if j < 0:
                    continue
                block = C[i, :, j, :]
                k = min(ua, ub)
                if ua == ub == 1:
                    total += float(block[0, 0])
                    continue
                # best inner assignment by enumeration over the smaller side
                if ua <= ub:
                    total += max(sum(float(block[r, c]) for r, c in zip(range(ua), cols))
                                 for cols in itertools.permutations(range(ub), k))
                else:
                    total += max(sum(float(block[r, c]) for r, c in zip(rows, range(ub)))
                                 for rows in itertools.permutations(range(ua), k))
        best = max(best, total)
    return best


def _total(tie, costs, maps) -> float:
    out = 0.0
    for ln in tie.links:
        m = maps[ln]
        ok = m >= 0
        out += float(costs[ln][torch.arange(len(m))[ok], m[ok]].sum())
    return out


@pytest.mark.parametrize("ha,hb,ua,ub", [(3, 3, (3, 2), (3, 2)), (3, 2, (3, 3), (2, 3)), (2, 3, (2, 1), (3, 1)),
                                         (2, 2, (1, 3), (1, 2))])
@pytest.mark.parametrize("seed", [0, 1])
def test_solve_tie_is_the_best_structured_map(ha, hb, ua, ub, seed):
    g = torch.Generator().manual_seed(seed)
    tie = TieLink("t", ("qk", "vo"), ha, hb, ua, ub)
    costs = {ln: torch.randn(ha * a, hb * b, generator=g, dtype=torch.float64)
             for ln, a, b in zip(tie.links, ua, ub)}
    maps = solve_tie(tie, costs)
    assert is_structured(tie, maps)
    for ln, a in zip(tie.links, ua):
        assert maps[ln].shape == (ha * a,)
    assert _total(tie, costs, maps) == pytest.approx(_brute_force(tie, costs), abs=1e-9)


def test_position_maps_and_the_structure_check():
    tie = TieLink("t", ("qk", "vo"), 3, 2, (2, 2), (2, 2))
    pm = tie_position_maps(tie)
    assert pm["qk"].tolist() == [0, 1, 2, 3, -1, -1] and is_structured(tie, pm)
    broken = dict(pm, qk=torch.tensor([0, 3, 2, 1, -1, -1]))      # a unit of head 1 in head 0
    assert not is_structured(tie, broken)
    split = dict(pm, vo=torch.tensor([2, 3, 0, 1, -1, -1]))        # vo's heads swapped, qk's not
    assert not is_structured(tie, split)


class Attention(nn.Module):
    """Plain multi-head self-attention with its own head size (inner width heads · head_dim)."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.h, self.hd = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x):
        B, T, _ = x.shape
        split = lambda t: t.reshape(B, T, self.h, self.hd).transpose(1, 2)   # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), -1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1))


def _spec(m: Attention) -> PermSpec:
    groups = {"qk": [("q.weight", 0), ("q.bias", 0), ("k.weight", 0), ("k.bias", 0)],
              "vo": [("v.weight", 0), ("v.bias", 0), ("o.weight", 1)],
              "in": [("q.weight", 1), ("k.weight", 1), ("v.weight", 1)], "out": [("o.weight", 0), ("o.bias", 0)]}
    tie = Tie(("qk", "vo"), (m.hd, m.hd), queries=(("q.weight", 0, 0), ("q.bias", 0, 0)))
    return PermSpec.from_groups(m, groups, fixed=("in", "out"), ties={"attn": tie})


def test_smaller_heads_zero_padded_into_larger_ones_compute_the_same():
    """A target with 2 heads of 5 dims aligned into a base with 3 heads of 8: at λ = 1 the merged
    model computes the target's outputs (zero Q/K dims add nothing to the logits, zero heads add
    nothing, and Q's factor sqrt(8 / 5) restores the target's softmax scale)."""
    torch.manual_seed(0)
    base, target = Attention(6, 3, 8), Attention(6, 2, 5)
    x = torch.randn(2, 7, 6)
    res = hm.align(base, target, base_spec=_spec(base), target_spec=_spec(target))
    assert is_structured(res.pairing.ties["attn"], res.maps)
    merged = hm.merge(base, target, res, lam=1.0)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), target(x), rtol=1e-5, atol=1e-6)
        # without the fold the logits would be divided by sqrt(8), not sqrt(5): it matters
        unfolded = hm.merge(base, target, res, lam=1.0)
        unfolded.q.weight.mul_(math.sqrt(5 / 8))
        unfolded.q.bias.mul_(math.sqrt(5 / 8))
        assert (unfolded(x) - target(x)).abs().max() > 1e-4


def test_bad_ties_are_refused_by_name():
    m = Attention(6, 2, 4)
    with pytest.raises(SpecError, match="not a multiple of 3 units per head"):
        PermSpec.from_groups(m, {"qk": [("q.weight", 0)], "vo": [("v.weight", 0)]},
                             ties={"attn": Tie(("qk", "vo"), (3, 4))})
    with pytest.raises(SpecError, match="different numbers of heads"):
        PermSpec.from_groups(m, {"qk": [("q.weight", 0)], "vo": [("v.weight", 0)]},
                             ties={"attn": Tie(("qk", "vo"), (4, 2))})
    with pytest.raises(SpecError, match="'nope' is not a free group"):
        PermSpec.from_groups(m, {"qk": [("q.weight", 0)]}, ties={"attn": Tie(("qk", "nope"), (4, 4))})


def test_a_map_that_splits_a_head_is_refused_on_merge():
    torch.manual_seed(1)
    a, b = Attention(6, 2, 4), Attention(6, 2, 4)
    res = hm.align(a, b, base_spec=_spec(a), target_spec=_spec(b))
    maps = dict(res.maps)
    maps["qk"] = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])     # unit 3 of head 0 <- a unit of head 1
    with pytest.raises(AlignmentError, match="move units between attention heads"):
        Alignment(res.pairing, maps)


def test_activation_matching_keeps_heads_whole():
    """With activations for only part of a tie (o's inputs probe the vo group, nothing probes qk),
    the tie is solved whole by weights: the maps stay structured and a planted head permutation is
    found."""
    torch.manual_seed(2)
    a = Attention(6, 3, 4)
    spec = _spec(a)
    spec.probes = {"vo": ("o", "linear")}
    perms = random_perms(spec, torch.Generator().manual_seed(3))
    b = Attention(6, 3, 4)
    b.load_state_dict(permute_state(spec, a.state_dict(), perms))
    res = hm.align(a, b, method="activation", data=torch.randn(4, 5, 6), base_spec=spec, target_spec=spec)
    assert is_structured(res.pairing.ties["attn"], res.maps)
    for g in ("qk", "vo"):
        assert torch.equal(res.maps[g], torch.argsort(perms[g])), g

"""Permutations that respect attention heads, for invariance tests of traced specs.

A spec's tie (spec.Tie) says: one head map for all its groups, any permutation inside a head, its
own per head and per group. ``structured_perms`` draws exactly that, written here from the
definition (not from the library's solver): new head i = old head h[i]; new unit j of head i in
group g = old unit inner_g,i[j] of head h[i]."""
import copy

import torch

from hetmerge.maps import permute_state


def structured_perms(spec, seed: int) -> dict:
    """group -> full unit permutation: every free group random, tied groups head-structured."""
    g = torch.Generator().manual_seed(seed)
    perms = {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}
    for tie in spec.ties.values():
        heads = tie.heads(spec.sizes)
        order = torch.randperm(heads, generator=g)
        for grp, hu in zip(tie.groups, tie.head_units):
            perms[grp] = torch.cat([order[i] * hu + torch.randperm(hu, generator=g) for i in range(heads)])
    return perms


def permuted(model, spec, perms):
    m = copy.deepcopy(model)
    m.load_state_dict(permute_state(spec, model.state_dict(), perms))
    return m


def check_head_invariance(model, x, spec, seeds=(0, 1, 2)):
    """Outputs unchanged under structured permutations of every free group (each one nontrivial)."""
    model = model.eval()
    ref = model(x)
    for s in seeds:
        perms = structured_perms(spec, s)
        for grp, p in perms.items():
            assert not torch.equal(p, torch.arange(len(p))), grp
        torch.testing.assert_close(permuted(model, spec, perms)(x), ref, rtol=1e-5, atol=1e-5)


def cross_head_swap(n: int, head_units: int) -> torch.Tensor:
    """A unit permutation that swaps unit 0 (in head 0) with the last unit of head 1, nothing else:
    not a head-structured map."""
    p = torch.arange(n)
    p[0], p[2 * head_units - 1] = 2 * head_units - 1, 0
    return p

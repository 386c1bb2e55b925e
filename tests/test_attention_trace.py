"""torch's attention modules traced (handlers/attention.py): nn.MultiheadAttention (packed q|k|v as
three parts of the tied groups qk | qk | vo) and nn.TransformerEncoderLayer (residual stream, heads,
MLP units). Checked by invariance (a random head-structured permutation of every free group leaves
the outputs unchanged, tests/head_perms.py; one that moves a q/k or v channel to another head does
not) and by weight matching recovering a planted permutation exactly (merging at λ = 1 gives the
base back)."""
import copy

import pytest
import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge.maps import permute_state
from hetmerge.spec import Tie
from head_perms import check_head_invariance, cross_head_swap, permuted, structured_perms
from test_vision_coverage import randomize


class MHABlock(nn.Module):
    """Embedding Linear, pre-norm self-attention with a residual, an MLP, a head."""

    def __init__(self, d=16, heads=4, hidden=24):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.embed(x)
        a = self.norm(h)
        h = h + self.attn(a, a, a)[0]
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


class Encoder(nn.Module):
    def __init__(self, d=16, heads=4, layers=2, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True,
                                                                 norm_first=norm_first) for _ in range(layers)])
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.layers(self.embed(x)).mean(1))


X = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(0))


def _invariant(model):
    """The traced spec, checked by invariance both ways: head-structured maps keep the outputs, a
    q/k or a v channel moved to another head changes them."""
    spec = hm.trace_spec(model, X)
    check_head_invariance(model, X, spec)
    for tie in spec.ties.values():
        for g, hu in zip(tie.groups, tie.head_units):
            perms = {grp: torch.arange(n) for grp, n in spec.sizes.items()}
            perms[g] = cross_head_swap(spec.sizes[g], hu)
            assert not torch.allclose(permuted(model, spec, perms)(X), model(X), rtol=1e-4, atol=1e-4), g
    return spec


def _recovered(model):
    spec = hm.trace_spec(model, X)
    perms = structured_perms(spec, 7)
    pm = copy.deepcopy(model)
    pm.load_state_dict(permute_state(spec, model.state_dict(), perms))
    res = hm.align(model, pm, example_input=X)
    for g, p in perms.items():
        assert torch.equal(res.maps[g], torch.argsort(p)), g
    torch.testing.assert_close(hm.merge(model, pm, res, lam=1.0)(X), model(X), rtol=1e-5, atol=1e-5)
    return spec


def test_multihead_attention_ties_qk_and_vo_heads_of_the_packed_projection():
    torch.manual_seed(0)
    m = randomize(MHABlock())
    spec = _invariant(m)
    assert spec.ties == {"attn": Tie(("attn.qk", "attn.vo"), (4, 4),
                                     (("attn.in_proj_weight", 0, 0), ("attn.in_proj_bias", 0, 0)))}
    assert spec.sizes["attn.qk"] == spec.sizes["attn.vo"] == 16
    for key in ("attn.in_proj_weight", "attn.in_proj_bias"):
        assert spec.segments[(key, 0)] == (("attn.qk", 16, 1), ("attn.qk", 16, 1), ("attn.vo", 16, 1))
    assert spec.groups["attn.vo"] == [("attn.out_proj.weight", 1)]
    assert ("attn.out_proj.weight", 1) not in spec.blocks
    _recovered(m)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layers_trace_and_align_exactly(norm_first):
    torch.manual_seed(1)
    m = randomize(Encoder(norm_first=norm_first))
    spec = _invariant(m)
    assert spec.ties == {f"layers.{i}.self_attn": Tie((f"layers.{i}.self_attn.qk", f"layers.{i}.self_attn.vo"),
                                                       (4, 4), ((f"layers.{i}.self_attn.in_proj_weight", 0, 0),
                                                                (f"layers.{i}.self_attn.in_proj_bias", 0, 0)))
                         for i in range(2)}
    assert spec.sizes["layers.1.linear1"] == 32
    _recovered(m)


def test_encoders_of_different_widths_pad_exactly():
    """An encoder whose first block has 20 MLP units mapped into one with 32: the 12 extra units are
    padding, and the mapped target (λ = 1) computes its own outputs exactly (same d_model, so no
    LayerNorm statistic changes)."""
    torch.manual_seed(2)
    base = randomize(Encoder(d=16, heads=4), seed=3)
    target = randomize(Encoder(d=16, heads=4), seed=4)
    target.layers[0].linear1 = nn.Linear(16, 20)
    target.layers[0].linear2 = nn.Linear(20, 16)
    res = hm.align(base, target, example_input=X)
    assert int((res.maps["layers.0.linear1"] < 0).sum()) == 12
    torch.testing.assert_close(hm.merge(base, target, res, lam=1.0)(X), target(X), rtol=1e-5, atol=1e-5)


def test_cross_attention_and_separate_projections_are_named():
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

        def forward(self, x, y):
            return self.attn(x, y, y)[0]

    with pytest.raises(hm.SpecError, match="kdim/vdim"):
        hm.trace_spec(KV())

"""Permutation graphs: each traced graph is checked by the invariance it promises -- permuting a
model's free groups at random leaves its outputs unchanged."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.maps import permute_state
from hetmerge.spec import PermSpec, SpecError

from helpers_models import randomize_bn


def random_perms(spec: PermSpec, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}


def check_invariance(model: nn.Module, x: torch.Tensor, seeds=(0, 1, 2)):
    model = model.eval()
    spec = hm.trace_spec(model, x)
    assert spec.free_groups, "nothing to permute"
    ref = model(x)
    for s in seeds:
        perms = random_perms(spec, s)
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
        m2 = copy.deepcopy(model)
        m2.load_state_dict(permute_state(spec, model.state_dict(), perms))
        out = m2(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    return spec


def test_mlp_groups_and_invariance():
    torch.manual_seed(0)
    m = hmm.mlp(64, [32, 16], 10)
    spec = check_invariance(m, torch.randn(20, 64))
    assert spec.sizes == {"fc0": 32, "fc1": 16}
    assert spec.fixed == {"input", "output"}
    assert sorted(spec.groups["fc0"]) == [("fc0.bias", 0), ("fc0.weight", 0), ("fc1.weight", 1)]
    assert [l.name for l in spec.layers] == ["fc0", "fc1", "head"]


def test_mlp_with_batchnorm_and_dropout_invariance():
    torch.manual_seed(0)
    m = randomize_bn(hmm.mlp(64, [32, 16], 10, bn=True, dropout=0.1))
    spec = check_invariance(m, torch.randn(20, 64))
    assert ("bn0.running_var", 0) in spec.groups["fc0"]
    assert spec.layers[0].params["norm.running_mean"] == "bn0.running_mean"


@pytest.mark.parametrize("spatial", [(8, 8), (12,)])
def test_cnn_with_batchnorm_invariance(spatial):
    torch.manual_seed(0)
    m = randomize_bn(hmm.cnn(1, [4, 6], 10, spatial, bn=True, hidden=12))
    spec = check_invariance(m, torch.randn(5, 1, *spatial))
    hw = 1
    for s in spatial:
        hw *= s
    # the flatten makes fc's input axis the conv1 channel axis with block H·W
    assert spec.blocks[("fc.weight", 1)] == hw
    assert ("fc.weight", 1) in spec.groups["conv1"]


def test_residual_mlp_joins_groups_invariance():
    torch.manual_seed(0)
    m = hmm.res_mlp(64, 16, 2, 10, hidden=24)
    spec = check_invariance(m, torch.randn(20, 64))
    stream = spec.groups["stem"]
    assert ("blocks.0.2.weight", 0) in stream and ("blocks.1.2.bias", 0) in stream
    assert ("blocks.1.0.weight", 1) in stream and ("head.weight", 1) in stream
    assert spec.sizes["blocks.0.0"] == 24


def test_residual_cnn_invariance():
    torch.manual_seed(0)
    m = randomize_bn(hmm.res_cnn(1, 6, 2, 10))
    spec = check_invariance(m, torch.randn(4, 1, 8, 8))
    assert ("blocks.1.4.running_var", 0) in spec.groups["stem"]


class ViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)
        h = h.view(h.size(0), -1)
        return self.out(F.gelu(self.fc(h)))


def test_view_batch_minus_one_is_followed():
    torch.manual_seed(0)
    spec = check_invariance(ViewNet(), torch.randn(3, 1, 8, 8))
    assert spec.blocks[("fc.weight", 1)] == 16


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)

    def forward(self, x):
        h = self.inp(x)
        return self.attn(h, h, h)[0]


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Sequential(nn.Linear(4, 3))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_attention_raises_naming_node_and_module():
    # plain self-attention traces (tests/test_attention_trace.py); what it cannot describe is named
    with pytest.raises(SpecError, match=r"node 'attn'.*module 'attn'.*MultiheadAttention with add_bias_kv"):
        hm.trace_spec(Attn())


def test_concatenation_raises_naming_node():
    with pytest.raises(SpecError, match=r"node 'cat'.*hand-written spec"):
        hm.trace_spec(Cat())


def test_hand_written_spec_validation():
    m = hmm.mlp(4, [6], 2)
    spec = PermSpec.from_groups(m, {"h": [("fc0.weight", 0), ("fc0.bias", 0), ("head.weight", 1)]})
    assert spec.sizes == {"h": 6} and spec.is_fixed("fc0.weight:1")
    with pytest.raises(SpecError, match=r"group 'h' has 6 units .* but 4"):
        PermSpec.from_groups(m, {"h": [("fc0.weight", 0), ("fc0.weight", 1)]})
    with pytest.raises(SpecError, match=r"key 'nope.weight'"):
        PermSpec.from_groups(m, {"h": [("nope.weight", 0)]})
    with pytest.raises(SpecError, match=r"axis 1 of 'fc0.bias'"):
        PermSpec.from_groups(m, {"h": [("fc0.bias", 1)]})
    with pytest.raises(SpecError, match=r"listed in groups 'h' and 'g'"):
        PermSpec.from_groups(m, {"h": [("fc0.bias", 0)], "g": [("fc0.bias", 0)]})


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, a hand-written spec can describe it."""

    def __init__(self, w=12):
        super().__init__()
        self.fc0 = nn.Linear(10, w)
        self.head = nn.Linear(w, 3)

    def forward(self, x):
        h = self.fc0(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.head(h)


def test_untraceable_model_needs_and_accepts_hand_written_spec():
    torch.manual_seed(0)
    base = Untraceable()
    with pytest.raises(SpecError, match="hand-written spec"):
        hm.trace_spec(base)
    groups = {"h": [("fc0.weight", 0), ("fc0.bias", 0), ("head.weight", 1)]}
    perm = torch.randperm(12)
    target = Untraceable()
    target.load_state_dict(permute_state(PermSpec.from_groups(base, groups), base.state_dict(),
                                         {"h": perm}))
    res = hm.align(base, target, base_spec=groups, target_spec=groups)
    # target unit perm[i] came from base unit i: base slot i must take target unit argsort(perm)[i]
    assert torch.equal(res.maps["h"], torch.argsort(perm))


def test_hand_written_spec_with_fixed_groups_aligns_heterogeneous_widths():
    spec = {"groups": {"h": [("fc0.weight", 0), ("fc0.bias", 0), ("head.weight", 1)],
                       "inp": [("fc0.weight", 1)]}, "fixed": ["inp"]}
    torch.manual_seed(0)
    base, target = hmm.mlp(64, [32], 10), hmm.mlp(64, [16], 10)
    res = hm.align(base, target, base_spec=spec, target_spec=spec)
    assert torch.equal(res.maps["inp"], torch.arange(64))          # fixed: by position
    assert int((res.maps["h"] >= 0).sum()) == 16
    x = torch.randn(8, 64)
    torch.testing.assert_close(hm.merge(base, target, res, lam=1.0)(x), target(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match=r"fixed group\(s\) \['nope'\]"):
        hm.align(base, target, base_spec={"groups": spec["groups"], "fixed": ["nope"]})

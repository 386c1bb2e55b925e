"""Vision families the tracer follows (docs/vision.md): each small self-built model of a family is
checked by its invariance -- a random permutation of every free group leaves the outputs unchanged --
and, where pairing supports it, by weight matching recovering a planted permutation exactly (the
maps invert it, so merging at λ = 1 gives back the base's weights and outputs). timm and torchvision
are not installable here; these models use the same constructs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.maps import permute_state
from hetmerge.spec import SpecError


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every floating parameter and buffer random (norm scales and running statistics away from
    1/0, so that a wrongly permuted one changes the outputs); variances positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(r.abs() + 0.5)
            elif t.dim() == 1:
                t.copy_(r * 0.5 + (1.0 if name.rpartition(".")[2] in ("weight", "gamma") else 0.0))
            else:
                t.copy_(r * t.shape[1] ** -0.5 * (1 if t.dim() == 2 else t[0, 0].numel() ** -0.5))
    return model.eval()


def random_perms(spec, seed):
    g = torch.Generator().manual_seed(seed)
    return {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}


def permuted(model, spec, perms):
    m2 = copy.deepcopy(model)
    m2.load_state_dict(permute_state(spec, model.state_dict(), perms))
    return m2


def check_invariance(model, x, seeds=(0, 1, 2), example=True):
    model = model.eval()
    spec = hm.trace_spec(model, x if example else None)
    assert spec.free_groups, "nothing to permute"
    ref = model(x)
    for s in seeds:
        perms = random_perms(spec, s)
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
        out = permuted(model, spec, perms)(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the invariance is not vacuous: moving one group's units alone, without the axes that follow
    # them, changes the outputs
    g = max(spec.sizes, key=spec.sizes.get)
    state = dict(model.state_dict())
    key, ax = next((k, a) for k, a in spec.groups[g] if state[k].dim() >= 2)
    bad = dict(state)
    bad[key] = state[key].roll(1, ax)
    m3 = copy.deepcopy(model)
    m3.load_state_dict(bad)
    assert not torch.allclose(m3(x), ref, rtol=1e-4, atol=1e-4)
    return spec


def check_recovery(model, x, seed=5):
    """Plant a permutation of every free group; weight matching must find its inverse."""
    model = model.eval()
    spec = hm.trace_spec(model)
    perms = random_perms(spec, seed)
    target = permuted(model, spec, perms)
    res = hm.align(model, target)
    for g, p in perms.items():
        # target unit i is base unit perms[g][i]: base slot j takes target unit argsort(perm)[j]
        assert torch.equal(res.maps[g], torch.argsort(p)), g
    merged = hm.merge(model, target, res, lam=1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(merged(x), target(x), rtol=1e-5, atol=1e-5)
    return res


# -- depthwise-separable (MobileNet) and grouped convolutions ------------------------------------

class DepthwiseSeparable(nn.Module):
    def __init__(self, c=8, out=12, bias=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias)
        self.dw_bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, out, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out)
        self.head = nn.Linear(out, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw_bn(self.pw(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("bias", [False, True])
def test_depthwise_conv_passes_the_channel_permutation_through(bias):
    torch.manual_seed(0)
    m = randomize(DepthwiseSeparable(bias=bias))
    spec = check_invariance(m, torch.randn(4, 1, 8, 8))
    stem = spec.groups["stem.0"]
    # the depthwise weight's axis 0 and its bias are in the stem's group; its axis 1 (size 1) in none
    assert ("dw.weight", 0) in stem and ("dw_bn.running_mean", 0) in stem and ("pw.weight", 1) in stem
    assert (("dw.bias", 0) in stem) == bias
    assert spec.axis_groups("dw.weight", 4)[1] == "dw.weight:1"
    assert spec.sizes == {"stem.0": 8, "pw": 12}
    check_recovery(m, torch.randn(4, 1, 8, 8))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.grouped(F.relu(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_grouped_conv_fixes_its_channels():
    torch.manual_seed(0)
    m = randomize(Grouped())
    spec = check_invariance(m, torch.randn(3, 1, 6, 6))
    # conv1's channels feed the grouped conv and cannot move; the grouped conv's output is fixed too;
    # conv3 stays free
    assert spec.sizes == {"conv3": 6}
    assert spec.is_fixed(spec.axis_groups("conv1.weight", 4)[0])
    assert spec.is_fixed(spec.axis_groups("grouped.weight", 4)[0])
    check_recovery(m, torch.randn(3, 1, 6, 6))


# -- dense block (DenseNet): concatenation along the channels ------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, c=6, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.block = nn.Sequential(DenseLayer(c, growth), DenseLayer(c + growth, growth))
        self.trans_bn = nn.BatchNorm2d(c + 2 * growth)
        self.trans = nn.Conv2d(c + 2 * growth, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = F.avg_pool2d(self.trans(F.relu(self.trans_bn(x))), 2)
        return self.head(x.flatten(1))


def test_dense_block_concatenation_is_a_block_combination_of_groups():
    torch.manual_seed(0)
    m = randomize(DenseNet())
    spec = check_invariance(m, torch.randn(3, 1, 8, 8))
    assert spec.sizes == {"stem": 6, "block.0.conv": 4, "block.1.conv": 4, "trans": 8}
    # the second dense layer reads [stem | layer 0], the transition [stem | layer 0 | layer 1]
    assert spec.segments[("block.1.conv.weight", 1)] == (("stem", 6, 1), ("block.0.conv", 4, 1))
    assert spec.segments[("trans_bn.running_var", 0)] == (("stem", 6, 1), ("block.0.conv", 4, 1),
                                                           ("block.1.conv", 4, 1))
    assert spec.blocks[("head.weight", 1)] == 16


def test_dense_block_planted_permutation_is_recovered():
    """Each part of a concatenation is solved by its own group's map: weight matching finds a planted
    permutation of the stem, both dense layers and the transition, and λ = 1 gives the base back."""
    torch.manual_seed(0)
    m = randomize(DenseNet())
    spec = hm.trace_spec(m)
    perms = random_perms(spec, 3)
    pm = copy.deepcopy(m)
    pm.load_state_dict(permute_state(spec, m.state_dict(), perms))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(pm(x), m(x), rtol=1e-5, atol=1e-5)
    res = hm.align(m, pm)
    for g, p in perms.items():
        assert torch.equal(res.maps[g], torch.argsort(p)), g
    torch.testing.assert_close(hm.merge(m, pm, res, lam=1.0)(x), m(x), rtol=1e-5, atol=1e-5)


def test_dense_block_with_narrower_growth_zero_pads_part_by_part():
    """A DenseNet with stem 4 and growth 2 mapped into one with stem 6 and growth 4: every part of the
    concatenated axes pads on its own (the transition reads [stem | layer 0 | layer 1] = 6+4+4 slots,
    4+2+2 of them the target's), and the mapped target computes its own outputs."""
    torch.manual_seed(0)
    base, target = randomize(DenseNet(6, 4), seed=1), randomize(DenseNet(4, 2), seed=2)
    res = hm.align(base, target)
    assert {g: int((m < 0).sum()) for g, m in res.maps.items() if g in ("stem", "block.0.conv", "block.1.conv")} \
        == {"stem": 2, "block.0.conv": 2, "block.1.conv": 2}
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(hm.merge(base, target, res, lam=1.0)(x), target(x), rtol=1e-5, atol=1e-5)
    # λ = 0.4 is (1 - λ)·base + λ·T(target) tensor by tensor, T applied part by part
    merged = hm.merge(base, target, res, lam=0.4).state_dict()
    w = target.state_dict()["trans.weight"]
    cols = torch.cat([res.maps["stem"], torch.where(res.maps["block.0.conv"] >= 0, res.maps["block.0.conv"] + 4, -1),
                      torch.where(res.maps["block.1.conv"] >= 0, res.maps["block.1.conv"] + 6, -1)])
    tw = w[res.maps["trans"]][:, cols.clamp(min=0)] * (cols >= 0).float()[None, :, None, None]
    torch.testing.assert_close(merged["trans.weight"], 0.6 * base.state_dict()["trans.weight"] + 0.4 * tw)


def test_concatenations_of_different_arity_are_refused_by_name():
    a, b = DenseNet(), DenseNet()
    b.block = nn.Sequential(DenseLayer(6, 4), nn.Identity())
    b.trans_bn, b.trans = nn.BatchNorm2d(10), nn.Conv2d(10, 8, 1)
    with pytest.raises(SpecError, match="concatenates 3 part"):
        hm.align(a, b, layer_map={"trans": "trans"})


class CatFlat(nn.Module):
    """Concatenation then flatten: the Linear's input axis holds the parts' units H·W entries each."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1).flatten(1))


def test_concatenation_then_flatten_keeps_block_per_part():
    torch.manual_seed(0)
    spec = check_invariance(randomize(CatFlat()), torch.randn(2, 1, 4, 4))
    assert spec.segments[("fc.weight", 1)] == (("a", 3, 16), ("b", 5, 16))


# -- ConvNeXt block: channels-last LayerNorm, Linear pointwise convs, layer scale -------------------

class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an NCHW tensor, by permuting them last."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """The original ConvNeXt code's channels-first LayerNorm, written out with channel statistics."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, expand * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expand * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))

    def forward(self, x):
        inp = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return inp + x


class ConvNeXt(nn.Module):
    def __init__(self, c=8, depth=2, stem_norm="timm"):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 2, stride=2)
        self.stem_norm = LayerNorm2d(c) if stem_norm == "timm" else ChannelsFirstLayerNorm(c)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c) for _ in range(depth)])
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.head(self.norm(x.mean((-2, -1))))


@pytest.mark.parametrize("stem_norm", ["timm", "channels_first"])
def test_convnext_channels_last_block(stem_norm):
    torch.manual_seed(0)
    m = randomize(ConvNeXt(stem_norm=stem_norm))
    x = torch.randn(3, 1, 8, 8)
    spec = check_invariance(m, x)
    stream = spec.groups["stem"]
    for axis in [("stem_norm.weight", 0), ("blocks.0.dwconv.weight", 0), ("blocks.0.norm.bias", 0),
                 ("blocks.0.pwconv1.weight", 1), ("blocks.0.pwconv2.weight", 0), ("blocks.0.gamma", 0),
                 ("blocks.1.gamma", 0), ("norm.weight", 0), ("head.weight", 1)]:
        assert axis in stream, axis
    assert spec.sizes == {"stem": 8, "blocks.0.pwconv1": 32, "blocks.1.pwconv1": 32}
    # without example_input the ranks come from the layers alone
    assert hm.trace_spec(m).groups == spec.groups
    check_recovery(m, x)


class ChannelsFirstLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.conv(x))   # acts on W, not on the channels


def test_linear_on_channels_first_tensor_fails():
    with pytest.raises(SpecError, match=r"node 'fc'.*last dim of a 4-d tensor whose channels are dim 1"):
        hm.trace_spec(ChannelsFirstLinear())


# -- squeeze-and-excitation (MobileNetV3 / EfficientNet) -------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c, r, linear=False):
        super().__init__()
        self.linear = linear
        self.fc1 = nn.Linear(c, r) if linear else nn.Conv2d(c, r, 1)
        self.fc2 = nn.Linear(r, c) if linear else nn.Conv2d(r, c, 1)

    def forward(self, x):
        if self.linear:
            s = x.mean((2, 3))
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
            return x * s.view(s.size(0), -1, 1, 1)
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileNetV3Block(nn.Module):
    def __init__(self, c=8, out=12, se_linear=False):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c, 4, se_linear)
        self.pw = nn.Conv2d(c, out, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out)
        self.head = nn.Linear(out, 10)

    def forward(self, x):
        x = F.hardswish(self.stem_bn(self.stem(x)))
        x = self.se(F.hardswish(self.dw_bn(self.dw(x))))
        x = self.pw_bn(self.pw(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("se_linear", [False, True])
def test_squeeze_excite_gate_joins_the_channels(se_linear):
    torch.manual_seed(0)
    m = randomize(MobileNetV3Block(se_linear=se_linear))
    x = torch.randn(3, 1, 6, 6)
    spec = check_invariance(m, x)
    # the SE bottleneck is its own group; fc2's output multiplies the channels, so it joins them
    assert spec.sizes == {"stem": 8, "se.fc1": 4, "pw": 12}
    assert ("se.fc2.weight", 0) in spec.groups["stem"] and ("se.fc1.weight", 1) in spec.groups["stem"]
    check_recovery(m, x)


# -- parameters used outside their module (BatchNormAct, functional conv/linear) ------------------

class BatchNormAct2d(nn.Module):
    """timm-style BatchNorm + activation, calling F.batch_norm with its own parameters."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.eps = eps

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return F.silu(x)


class StdConv2d(nn.Module):
    """A conv written with F.conv2d and its own parameters."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, 1)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = StdConv2d(1, 6)
        self.bn1 = BatchNormAct2d(6)
        self.conv2 = nn.Conv2d(6, 10, 3, padding=1)
        self.bn2 = BatchNormAct2d(10)
        self.fc_w = nn.Parameter(torch.randn(7, 10))
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(F.relu(F.linear(x.mean((2, 3)), self.fc_w)))


def test_parameters_used_outside_their_module_are_followed():
    torch.manual_seed(0)
    m = randomize(FunctionalNet())
    x = torch.randn(3, 1, 6, 6)
    spec = check_invariance(m, x)
    assert spec.sizes == {"conv1": 6, "conv2": 10, "fc_w": 7}
    assert {("bn1.running_mean", 0), ("bn1.weight", 0), ("conv1.bias", 0)} <= set(spec.groups["conv1"])
    assert spec.layers[0].params == {"weight": "conv1.weight", "bias": "conv1.bias",
                                     "norm.running_mean": "bn1.running_mean",
                                     "norm.running_var": "bn1.running_var",
                                     "norm.weight": "bn1.weight", "norm.bias": "bn1.bias"}
    check_recovery(m, x)


class ClampedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.floor = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.clamp(self.fc(x), min=self.floor))


def test_handler_that_ignores_a_parameter_fails():
    # a unit-wise handler for clamp would leave the per-channel floor unpermuted: the walk notices
    from hetmerge.trace import _CALL_HANDLERS

    @hm.register_handler(torch.clamp)
    def _clamp(tracer, node, fn):
        return tracer.value(node.args[0])
    try:
        with pytest.raises(SpecError, match=r"node 'clamp'.*reads parameter 'floor', which its handler "
                                            r"does not follow"):
            hm.trace_spec(ClampedScale())
    finally:
        del _CALL_HANDLERS[torch.clamp]


# -- control flow fx cannot trace -------------------------------------------------------------------

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:     # depends on the data: fx cannot trace it
            return self.fc(x)
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.blocks = nn.Sequential(nn.ReLU(), Gate())
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def test_untraceable_control_flow_names_the_module_and_the_remedies():
    with pytest.raises(SpecError, match=r"module 'blocks.1' \(Gate\) failed: symbolically traced variables "
                                        r"cannot be used as inputs to control flow.*Register a handler for "
                                        r"Gate.*concrete_args"):
        hm.trace_spec(GatedNet())


def test_registering_the_untraceable_module_makes_it_a_leaf():
    from hetmerge.trace import _MODULE_HANDLERS

    @hm.register_handler(Gate)
    def _gate(tracer, node, module):
        x = tracer.single_input(node, module)
        path = str(node.target)
        y = tracer.weighted(f"{path}.fc", x, f"{path}.fc.weight", f"{path}.fc.bias")
        tracer.join(x.group, y.group)   # the branch that skips fc returns x: same units either way
        return y
    try:
        torch.manual_seed(0)
        m = randomize(GatedNet())
        spec = check_invariance(m, torch.randn(5, 4), example=False)
        assert spec.sizes == {"inp": 6}
    finally:
        del _MODULE_HANDLERS[Gate]


# -- other layouts and norms ------------------------------------------------------------------------

class TransposedMixer(nn.Module):
    """Channels moved last with transpose (instead of permute) and back; an SE gate unsqueezed."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.mix = nn.Linear(c, c)
        self.gate = nn.Linear(c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        y = self.mix(self.norm(x.transpose(1, -1))).transpose(1, -1)
        g = torch.sigmoid(self.gate(y.mean((2, 3))))
        return self.head(y * g.unsqueeze(-1).unsqueeze(-1) + x)


def test_transpose_and_unsqueeze_keep_track_of_the_channels():
    torch.manual_seed(0)
    m = randomize(TransposedMixer())
    x = torch.randn(2, 1, 5, 5)
    spec = check_invariance(m, x)
    assert spec.sizes == {"conv": 6}
    assert {("mix.weight", 0), ("gate.weight", 0), ("norm.weight", 0)} <= set(spec.groups["conv"])
    check_recovery(m, x)


class GroupNormNet(nn.Module):
    def __init__(self, groups, functional=False):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(groups, 8)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv1(x)
        if self.functional:
            x = F.group_norm(x, self.gn.num_groups, self.gn.weight, self.gn.bias, self.gn.eps)
        else:
            x = self.gn(x)
        return self.head(self.conv2(F.relu(x)).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("groups", [1, 8, 2])
def test_group_norm_permutes_only_when_statistics_ignore_the_order(groups, functional):
    torch.manual_seed(0)
    m = randomize(GroupNormNet(groups, functional))
    spec = check_invariance(m, torch.randn(3, 1, 5, 5))
    # 1 group or one channel per group: free; 2 groups of 4: the channels are fixed
    assert ("conv1" in spec.sizes) == (groups != 2)
    assert spec.sizes["conv2"] == 5
    assert spec.axis_groups("gn.weight", 1)[0] == spec.axis_groups("conv1.weight", 4)[0]


class NonPersistentScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.register_buffer("scale", torch.arange(1.0, 5.0).view(4, 1, 1), persistent=False)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * self.scale)


def test_channel_scale_outside_the_state_dict_fails():
    # permuting the conv's channels would need the buffer permuted too, and no state dict holds it
    with pytest.raises(SpecError, match=r"scale scales the channels but is not in the state dict"):
        hm.trace_spec(NonPersistentScale())


class FlattenChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))


def test_flatten_of_channels_last_fails():
    # [N, H, W, C] flattened is spatial-major: the fc's input axis is not unit-major blocks
    with pytest.raises(SpecError, match=r"node 'flatten'.*channels-last"):
        hm.trace_spec(FlattenChannelsLast())


class TypeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x.type_as(self.fc.weight))))


def test_parameter_read_for_its_dtype_only_needs_no_axis():
    spec = hm.trace_spec(TypeAs())
    assert spec.sizes == {"fc": 6}


class PadUpsample(nn.Module):
    """Same-padding written as F.pad (timm's Conv2dSame), padding modules, and U-Net style upsampling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, 3)
        self.pad = nn.ReflectionPad2d(1)
        self.conv2 = nn.Conv2d(5, 7, 3, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv1(F.pad(x, (1, 1, 1, 1))))
        x = F.relu(self.conv2(self.pad(x)))
        return self.head(F.interpolate(self.up(x), scale_factor=0.5, mode="bilinear"))


def test_spatial_padding_and_resizing_keep_the_channels():
    torch.manual_seed(0)
    spec = check_invariance(randomize(PadUpsample()), torch.randn(2, 1, 8, 8))
    assert spec.sizes == {"conv1": 5, "conv2": 7}


class ChannelPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(F.pad(self.conv(x), (0, 0, 0, 0, 1, 1)))


def test_padding_the_channels_fails():
    with pytest.raises(SpecError, match=r"node 'pad'.*pads the channel axis"):
        hm.trace_spec(ChannelPad())


class WSConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardized per output channel in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = WSConv2d(1, 6, 3, padding=1)
        self.conv2 = WSConv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_computed_conv_weight_fails_until_a_handler_describes_it():
    from hetmerge.trace import _MODULE_HANDLERS
    with pytest.raises(SpecError, match=r"node 'conv2d'.*its weight is not a parameter of the model as stored"):
        hm.trace_spec(WSNet())

    @hm.register_handler(WSConv2d)
    def _ws(tracer, node, module):   # standardization is per output channel: a plain conv's axes
        return tracer.linear(node, module, tracer.single_input(node, module), kind="conv")
    try:
        torch.manual_seed(0)
        spec = check_invariance(randomize(WSNet()), torch.randn(2, 1, 5, 5))
        assert spec.sizes == {"conv1": 6, "conv2": 4}
    finally:
        del _MODULE_HANDLERS[WSConv2d]


class CatHeads(nn.Module):
    def __init__(self, add=False):
        super().__init__()
        self.add = add
        self.hidden = nn.Linear(4, 5)
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 2)
        self.c = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        out = torch.cat([self.a(h), self.b(h)], dim=-1)
        return out + self.c(h) if self.add else out


def test_concatenation_into_the_output_fixes_its_parts():
    torch.manual_seed(0)
    spec = check_invariance(randomize(CatHeads()), torch.randn(6, 4))
    assert spec.sizes == {"hidden": 5}
    assert spec.is_fixed(spec.axis_groups("a.weight", 2)[0]) and spec.is_fixed(spec.axis_groups("b.bias", 1)[0])


def test_adding_to_a_concatenation_fails():
    with pytest.raises(SpecError, match=r"cannot join a channel concatenation.*node 'add'"):
        hm.trace_spec(CatHeads(add=True), torch.randn(6, 4))

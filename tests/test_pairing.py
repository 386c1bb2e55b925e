"""Pairing the layers of a base with those of a target: layer-map keys (names, "#N" positions),
models with nothing to pair, and residual nets paired within stages. Each test is named after the
bug it pins."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.maps import permute_state
from hetmerge.pairing import (LayerMapError, NothingToAlignError, _block_of, _default_layer_map, pair_specs,
                              resolve_layer)
from hetmerge.spec import SpecError
from hetmerge.trace import trace_spec

from helpers_models import TinyResNet, deepen_with_identity_blocks, randomize_bn, seq_net


def _seq_pair():
    """Plain nn.Sequential nets, layers named "0", "2", "4", "6"; every hidden width differs so a
    link's sizes tell which layers were paired."""
    torch.manual_seed(0)
    return seq_net([8, 6, 5, 4, 3]), seq_net([8, 7, 9, 5, 3])


# ---------------------------------------------------------------------------------------------
# 1. digit layer names are names; positions are "#N"
# ---------------------------------------------------------------------------------------------

def test_digit_layer_names_are_names_not_positions():
    base, target = _seq_pair()
    assert [l.name for l in trace_spec(base).layers] == ["0", "2", "4", "6"]
    # on main an int key (and "2" from --layer-map or a plan) was a position: 2 meant layer "4"
    for lm in ({"2": "2"}, {2: 2}, {"#1": "#1"}, {"2": "#1"}, [("2", "2")]):
        res = hm.align(base, target, layer_map=lm)
        assert res.layer_map == {"2": "2"}, lm
        # the layer named 2 is Linear(6, 5) in the base, Linear(7, 9) in the target
        link = res.pairing.links[_out_group(base, "2")]
        assert (link.n_a, link.n_b) == (5, 9) and res.maps[link.name].shape == (5,)


def _out_group(model, layer):
    spec = trace_spec(model)
    key = next(l for l in spec.layers if l.name == layer).params["weight"]
    return spec.axis_groups(key, 2)[0]


def test_digit_layer_map_to_a_name_past_the_layer_count_is_not_an_index_error():
    base, target = _seq_pair()
    # "4" is a target layer name; as a position it is past the end of 4 layers (IndexError on main)
    with pytest.warns(UserWarning, match="deeper target layers"):   # a hand-written deep pair
        res = hm.align(base, target, layer_map={"2": "4"})
    assert res.layer_map == {"2": "4"}
    link = res.pairing.links[_out_group(base, "2")]
    assert (link.n_a, link.n_b) == (5, 5)


@pytest.mark.parametrize("lm, needle", [
    ({"2": "1"}, r"layer_map: target layer '1' is not a layer of the target \(a position is written '#1'\); "
                 r"layers: #0 0, #1 2, #2 4, #3 6"),
    ({"#4": "2"}, r"layer_map: base layer '#4': position 4 is out of range, the base has 4 layers: #0 0"),
    ({"#x": "2"}, r"layer_map: base layer '#x': a position is '#' and a number in 0..3"),
    ({"nope": "2"}, r"layer_map: base layer 'nope' is not a layer of the base; layers: #0 0, #1 2"),
    ({"2": "2", "#1": "4"}, r"layer_map: base layer '2' and '#1' are both '2'"),
])
def test_unknown_layer_or_out_of_range_position_is_a_clear_error(lm, needle):
    base, target = _seq_pair()
    with pytest.raises(LayerMapError, match=needle) as info:
        hm.align(base, target, layer_map=lm)
    assert isinstance(info.value, SpecError) and isinstance(info.value, KeyError)
    assert not str(info.value).startswith('"')     # no KeyError quoting in messages


def test_per_layer_lam_keys_resolve_like_layer_map_keys():
    base, target = _seq_pair()
    res = hm.align(base, target, layer_map={"0": "0", "2": "2"})
    by_name = hm.merge(base, target, res, lam={"2": 0.3})
    by_pos = hm.merge(base, target, res, lam={"#1": 0.3})
    for k, v in by_name.state_dict().items():
        assert torch.equal(v, by_pos.state_dict()[k]), k
    # independent reference: layer "2" only, (1 - λ)·A + λ·B[rows][:, cols]
    rows = res.maps[_out_group(base, "2")]
    cols = res.maps[_out_group(base, "0")]
    assert bool((rows >= 0).all()) and bool((cols >= 0).all())   # target is wider on both axes
    ref = 0.7 * base[2].weight + 0.3 * target[2].weight[rows][:, cols]
    torch.testing.assert_close(by_name[2].weight, ref)
    assert torch.equal(by_name[0].weight, base[0].weight) and torch.equal(by_name[6].weight, base[6].weight)
    with pytest.raises(LayerMapError, match=r"lam: '#7': position 7 is out of range"):
        hm.merge(base, target, res, lam={"#7": 0.3})
    with pytest.raises(LayerMapError, match=r"lam: '4' is not a paired base layer; paired layers: \['0', '2'\]"):
        hm.merge(base, target, res, lam={"4": 0.3})


def test_resolve_layer_rule():
    layers = ["0", "2", "4"]
    assert resolve_layer("2", layers) == "2" and resolve_layer(2, layers) == "2"
    assert resolve_layer("#2", layers) == "4" and resolve_layer(" #0 ", layers) == "0"
    with pytest.raises(LayerMapError, match=r"base layer 1 is not a layer of the base \(a position is written '#1'\)"):
        resolve_layer(1, layers)
    with pytest.raises(LayerMapError, match="must be a layer name"):
        resolve_layer(True, layers)


# ---------------------------------------------------------------------------------------------
# 2. nothing to align is an error, not a copy of the base
# ---------------------------------------------------------------------------------------------

def _cnn_and_mlp():
    torch.manual_seed(0)
    return hmm.cnn(1, [4, 4], 10, (8, 8)), hmm.mlp(64, [16], 10)


def test_cnn_against_mlp_has_nothing_to_align():
    cnn, mlp = _cnn_and_mlp()
    for base, target in ((cnn, mlp), (mlp, cnn)):
        with pytest.raises(NothingToAlignError) as info:
            pair_specs(base, target, trace_spec(base), trace_spec(target))
        msg = str(info.value)
        assert "nothing to align" in msg and "no base layer has the kind of a target layer" in msg
        for name in ("conv0 [Conv2d 3x3 (hidden)]", "fc0 [Linear (hidden)]",
                     "head [Linear reading a flatten (64 entries per unit) writing the output (head)]",
                     "head [Linear writing the output (head)]"):
            assert name in msg, (name, msg)
        for call in (lambda: hm.align(base, target), lambda: hm.merge(base, target, None, lam=0.5),
                     lambda: hm.sweep(base, target, None, [0.0, 1.0],
                                      data=(torch.zeros(2, 1, 8, 8) if base is cnn else torch.zeros(2, 64),
                                            torch.zeros(2, dtype=torch.long)))):
            with pytest.raises(NothingToAlignError):
                call()


def test_only_heads_alike_at_different_depths_has_nothing_to_align():
    torch.manual_seed(0)
    # a pooled CNN's head reads 8 units like an MLP head does, but the hidden layers are of other
    # kinds and the depths differ, so the heads are not merged either: nothing pairs
    base, target = hmm.res_cnn(1, 8, 1, 10), hmm.mlp(64, [8, 8], 10)
    with pytest.raises(NothingToAlignError, match=r"every hidden layer of both models is paired \(hidden layers: base 3, target 2, paired 0\)"):
        hm.align(base, target)
    with pytest.raises(NothingToAlignError, match="the layer map is empty"):
        hm.align(base, target, layer_map={})


# ---------------------------------------------------------------------------------------------
# 4. residual nets of different depth pair within stages
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, block", [
    ("layer1.0.conv1", ("layer1", 0)), ("layer2.1.downsample.0", ("layer2", 1)),
    ("stages.1.blocks.0.conv", ("stages.1.blocks", 0)), ("blocks.2.0", ("blocks", 2)),
    ("2", None), ("fc", None), ("features.3", None), ("stem.conv", None),
])
def test_block_of_reads_stage_and_block_from_module_paths(name, block):
    assert _block_of(name) == block


def _names(stem, stage_fmt, blocks, inner, head):
    return [stem] + [stage_fmt.format(s=s, i=i) + "." + x for s, n in enumerate(blocks) for i in range(n)
                     for x in inner] + [head]


@pytest.mark.parametrize("base, target, expected", [
    # torchvision naming, stages by name: block i of layer{s} with block i of layer{s}
    (_names("conv1", "layer{s}.{i}", (3, 1), ("conv1", "conv2"), "fc"),
     _names("conv1", "layer{s}.{i}", (1, 2), ("conv1", "conv2"), "fc"),
     {"conv1": "conv1", "layer0.0.conv1": "layer0.0.conv1", "layer0.0.conv2": "layer0.0.conv2",
      "layer1.0.conv1": "layer1.0.conv1", "layer1.0.conv2": "layer1.0.conv2", "fc": "fc"}),
    # other naming conventions on each side: stages by order
    (_names("stem", "stages.{s}.blocks.{i}", (2, 1), ("conv",), "head"),
     _names("conv1", "layer{s}.{i}", (1, 1), ("conv1",), "fc"),
     {"stem": "conv1", "stages.0.blocks.0.conv": "layer0.0.conv1", "stages.1.blocks.0.conv": "layer1.0.conv1",
      "head": "fc"}),
    # a Sequential inside each block (layer1.0.branch.0): still paired block by block, by name
    (_names("stem", "layer{s}.{i}.branch", (3, 1), ("0", "2"), "fc"),
     _names("stem", "layer{s}.{i}.branch", (1, 1), ("0", "2"), "fc"),
     {"stem": "stem", "layer0.0.branch.0": "layer0.0.branch.0", "layer0.0.branch.2": "layer0.0.branch.2",
      "layer1.0.branch.0": "layer1.0.branch.0", "layer1.0.branch.2": "layer1.0.branch.2", "fc": "fc"}),
])
def test_default_layer_map_pairs_blocks_across_stages(base, target, expected):
    kinds = lambda names: [None] * len(names)    # one kind everywhere: only the stage rule decides
    assert _default_layer_map(base, target, kinds(base), kinds(target)) == expected


def _stage_block(name):
    parts = name.split(".")
    return parts[0], parts[1]


@pytest.mark.parametrize("blocks_base, blocks_target", [((2, 2), (3, 3)), ((3, 3), (2, 2)), ((2, 3), (3, 2))])
def test_residual_stages_of_different_depth_pair_within_stages(blocks_base, blocks_target):
    torch.manual_seed(0)
    base = randomize_bn(TinyResNet(blocks_base), 1)
    target = randomize_bn(TinyResNet(blocks_target), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # main paired across stages, then warned about its choice
        res = hm.align(base, target)
    expected = {"conv1": "conv1"}
    for s in (1, 2):
        for i in range(min(blocks_base[s - 1], blocks_target[s - 1])):
            for conv in ("conv1", "conv2") + (("downsample.0",) if s == 2 and i == 0 else ()):
                expected[f"layer{s}.{i}.{conv}"] = f"layer{s}.{i}.{conv}"
    assert res.layer_map == expected
    for b, t in res.layer_map.items():
        if b != "conv1":
            assert _stage_block(b) == _stage_block(t)


def test_deeper_base_with_identity_blocks_merges_exactly_at_lam_one():
    """base = target (hidden units permuted away) + one identity block per stage. Aligning recovers
    the permutation, so λ = 1 on the paired blocks gives back the base's weights exactly, and the
    extra blocks keep theirs: merged == base, and computes the target's function."""
    torch.manual_seed(0)
    target = randomize_bn(TinyResNet((2, 2)), 1)
    base = deepen_with_identity_blocks(target, (3, 3))
    spec = trace_spec(target)
    g = torch.Generator().manual_seed(3)
    perms = {gr: torch.randperm(n, generator=g) for gr, n in spec.sizes.items()}
    shuffled = TinyResNet((2, 2))
    shuffled.load_state_dict(permute_state(spec, target.state_dict(), perms))
    shuffled.eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(base(x), target(x), rtol=0, atol=0)
    assert not torch.equal(shuffled.layer1[0].conv1.weight, target.layer1[0].conv1.weight)

    res = hm.align(base, shuffled)
    merged = hm.merge(base, shuffled, res, lam=1.0)
    for k, v in base.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k
    torch.testing.assert_close(merged(x), shuffled(x))

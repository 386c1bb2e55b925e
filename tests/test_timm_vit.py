"""A timm-style VisionTransformer end to end (written here in timm's style, timm is not installed):
PatchEmbed (Conv2d stride = kernel, flatten(2).transpose(1, 2)), a cls token concatenated along the
tokens, a learned position embedding added, pre-norm blocks with hand-written fused-qkv attention,
final norm, cls pooling or mean pooling, head.

cls_token [1, 1, D] and pos_embed [1, N+1, D] hold the residual features on their last axis (axis 2,
which a PermSpec cannot permute): the tracer records a 2-D view of each (spec.PermSpec.views,
[1, N+1, D] seen as [N+1, D]) and lists axis 1 of the view in the residual group. Checked: the spec
(residual group members), invariance under a random head-structured permutation (pure torch:
permuted state dict, outputs compared), recovery of a planted permutation by hm.align with merge
at λ=1 reproducing the base, and widths 32 vs 24 aligned and merged."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.spec import SpecError
from head_perms import check_head_invariance, permuted, structured_perms
from test_handwritten_attention import Attention, SeparateAttention
from test_vision_coverage import randomize

IMG, PATCH, CH, CLASSES = 8, 4, 3, 5
X = torch.randn(3, CH, IMG, IMG, generator=torch.Generator().manual_seed(0))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(CH, dim, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)   # [B, C, H, W] -> [B, H·W, C]
        return self.norm(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, separate=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SeparateAttention(dim, heads) if separate else Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm.models.vision_transformer.VisionTransformer, trimmed (class token, learned position
    embedding, global_pool "token" or "avg")."""

    def __init__(self, dim=32, heads=4, depth=2, hidden=48, global_pool="token", pos_shape=None,
                 separate=False):
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(dim)
        n = (IMG // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(*(pos_shape or (1, n + 1)), dim) * .02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden, separate) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x):
        x = x[:, 0] if self.global_pool == "token" else x.mean(dim=1)
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def vit(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(VisionTransformer(**kw), seed)


RESIDUAL = "patch_embed.proj"


def test_timm_vit_residual_group_holds_stem_tokens_norms_and_block_ends():
    spec = hm.trace_spec(vit(), X)
    assert spec.views == {"cls_token": (1, 32), "pos_embed": (5, 32)}
    res = set(spec.groups[RESIDUAL])
    want = {("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0), ("cls_token", 1), ("pos_embed", 1),
            ("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)}
    for i in range(2):
        b = f"blocks.{i}"
        want |= {(f"{b}.norm1.weight", 0), (f"{b}.norm1.bias", 0), (f"{b}.norm2.weight", 0),
                 (f"{b}.norm2.bias", 0), (f"{b}.attn.qkv.weight", 1), (f"{b}.attn.proj.weight", 0),
                 (f"{b}.attn.proj.bias", 0), (f"{b}.mlp.fc1.weight", 1), (f"{b}.mlp.fc2.weight", 0),
                 (f"{b}.mlp.fc2.bias", 0)}
    assert res == want
    assert spec.sizes[RESIDUAL] == 32
    assert spec.groups["input"] == [("patch_embed.proj.weight", 1)]
    assert set(spec.groups["output"]) == {("head.weight", 0), ("head.bias", 0)}
    assert set(spec.ties) == {"blocks.0.attn", "blocks.1.attn"}


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_vit_outputs_unchanged_under_structured_permutation(pool):
    m = vit(global_pool=pool)
    spec = hm.trace_spec(m, X)
    check_head_invariance(m, X, spec)


def test_timm_vit_permuting_pos_embed_alone_changes_outputs():
    """The view's axis 1 is the one that must move: permuting only the residual group's
    cls_token/pos_embed columns, everything else fixed, changes the outputs (so the invariance
    above does depend on them being in the group)."""
    m = vit()
    spec = hm.trace_spec(m, X)
    p = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    t = copy.deepcopy(m)
    with torch.no_grad():
        t.pos_embed.copy_(m.pos_embed[..., p])
    assert not torch.allclose(t(X), m(X), atol=1e-4)
    # and the permuted state's pos_embed is the reference permutation of its last axis
    perms = structured_perms(spec, 0)
    st = hm.maps.permute_state(spec, m.state_dict(), perms)
    torch.testing.assert_close(st["pos_embed"], m.pos_embed.detach()[..., perms[RESIDUAL]], rtol=0, atol=0)
    torch.testing.assert_close(st["cls_token"], m.cls_token.detach()[..., perms[RESIDUAL]], rtol=0, atol=0)
    assert st["pos_embed"].shape == m.pos_embed.shape


def test_timm_vit_align_recovers_planted_permutation_and_merge_reproduces_base():
    m = vit()
    spec = hm.trace_spec(m, X)
    perms = structured_perms(spec, 5)
    t = permuted(m, spec, perms)
    res = hm.align(m, t)
    for g, p in perms.items():
        # target unit i is base unit p[i]: base slot p[i] takes target unit i
        assert torch.equal(res.maps[g], torch.argsort(p)), g
    merged = hm.merge(m, t, res, lam=1.0)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(merged(X), m(X), rtol=1e-6, atol=1e-6)
    # half-way merge of a model with its permuted copy is the model too
    torch.testing.assert_close(hm.merge(m, t, res, lam=0.5)(X), m(X), rtol=1e-5, atol=1e-5)
    # sweep reads the same merged tensors (stacked)
    curve = hm.sweep(m, t, res, [0.0, 1.0], data=(X, m(X).argmax(1)))
    assert curve.acc[0] == curve.acc[1] == 1.0


def test_timm_vit_different_widths_align_and_merge():
    base, target = vit(0, dim=32, heads=4), vit(1, dim=24, heads=3)   # head size 8 in both
    res = hm.align(base, target)
    assert res.maps[RESIDUAL].shape == (32,)
    assert int((res.maps[RESIDUAL] >= 0).sum()) == 24
    pairs = {pp.base_key: (pp.base_view, pp.target_view) for pp in res.pairing.params}
    assert pairs["pos_embed"] == ((5, 32), (5, 24)) and pairs["cls_token"] == ((1, 32), (1, 24))
    torch.testing.assert_close(hm.merge(base, target, res, lam=0.0)(X), base(X), rtol=0, atol=0)
    padded = hm.merge(base, target, res, lam=1.0)
    out = padded(X)
    assert out.shape == (3, CLASSES) and torch.isfinite(out).all()
    # the padded pos_embed is the target's, its columns placed by the residual map (pure torch)
    m = res.maps[RESIDUAL]
    want = torch.zeros(1, 5, 32)
    want[..., m >= 0] = target.pos_embed.detach()[..., m[m >= 0]]
    torch.testing.assert_close(padded.pos_embed.detach(), want, rtol=0, atol=0)
    assert torch.isfinite(hm.merge(base, target, res, lam=0.5)(X)).all()
    # the row-block path (streamed merges) of a viewed tensor: its one stored row is all of it
    from hetmerge.merging import merge_items, merge_tensor
    item = next(it for it in merge_items(res.pairing, res.maps, 1.0) if it.base_key == "pos_embed")
    sa, sb = base.state_dict(), target.state_dict()
    torch.testing.assert_close(merge_tensor(item, sa, sb, row_range=(0, 1))[0], want, rtol=0, atol=0)


def test_timm_vit_pos_embed_with_leading_dims_is_refused():
    m = vit(pos_shape=(3, 5))      # [3, 5, D]: one embedding per batch element (dim 0 is not 1)
    with pytest.raises(SpecError, match=r"pos_embed.*axis 2.*\[1, \.\.\., 1, n, C\]"):
        hm.trace_spec(m, X)


def test_timm_vit_cls_token_along_channels_is_refused():
    class CatChannels(VisionTransformer):
        def forward_features(self, x):
            x = self.patch_embed(x)
            return torch.cat([x, self.cls_token.expand(x.shape[0], x.shape[1], -1)], dim=2)

        def forward_head(self, x):
            return x.mean(1)
    torch.manual_seed(0)
    with pytest.raises(SpecError, match="parameter along the channels"):
        hm.trace_spec(CatChannels(), X)


def test_hand_written_spec_with_views_validates_against_the_view():
    m = vit()
    traced = hm.trace_spec(m, X)
    spec = hm.PermSpec.from_groups(m, {RESIDUAL: traced.groups[RESIDUAL]}, views=traced.views)
    assert spec.views == traced.views and spec.sizes[RESIDUAL] == 32
    # the residual group alone already leaves the outputs unchanged when permuted
    check_head_invariance(m, X, spec)
    with pytest.raises(SpecError, match="cannot be permuted"):
        hm.PermSpec.from_groups(m, {"r": [("pos_embed", 2)]})
    with pytest.raises(SpecError, match="not a 2-D shape"):
        hm.PermSpec.from_groups(m, {"r": [("pos_embed", 1)]}, views={"pos_embed": (4, 32)})


def test_timm_vit_align_many_and_merge_many_read_the_views():
    """C2M3 (hm.align_many) over a ViT and two planted permutations of it (separate q/k/v: the
    universe does not model fused axes): the maps are recovered, and merge_many of the three is the
    model (its cls_token / pos_embed merged through their views and stored back as [1, n, D])."""
    m = vit(separate=True)
    spec = hm.trace_spec(m, X)
    perms = [structured_perms(spec, s) for s in (11, 12)]
    models = [m] + [permuted(m, spec, p) for p in perms]
    res = hm.align_many(models, example_input=X, seed=0)
    for j, p in enumerate(perms, start=1):
        al = res.pair(0, j)
        for g, pj in p.items():
            assert torch.equal(al.maps[g], torch.argsort(pj)), (j, g)
    merged = hm.merge_many(models, res)
    assert merged.pos_embed.shape == m.pos_embed.shape
    torch.testing.assert_close(merged(X), m(X), rtol=1e-5, atol=1e-5)


class _Conv(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.conv, self.fc, self.tail = nn.Conv2d(CH, 6, 3), nn.Linear(6, 2), tail

    def forward(self, x):
        return self.fc(self.tail(self.conv(x)))


@pytest.mark.parametrize("tail, msg", [
    (lambda y: y.flatten(1, 2), "flatten"),                                 # channels with H only
    (lambda y: y.flatten(2).transpose(1, 2)[:, :6, 0], "of the channel axis"),   # picks a channel
])
def test_flatten_or_indexing_that_splits_channels_is_refused(tail, msg):
    """flatten(1, 2) mixes the channels with one spatial dim (not unit-major over the rest), and
    indexing the channel axis picks units: neither can be followed."""
    with pytest.raises(SpecError, match=msg):
        hm.trace_spec(_Conv(tail), X)


def test_token_slice_and_spatial_flatten_keep_channels():
    """x.flatten(2).transpose(1, 2)[:, 1:] keeps every channel: the conv's output group reaches
    the Linear's input (invariance under a random permutation of it)."""
    m = randomize(_Conv(lambda y: y.flatten(2).transpose(1, 2)[:, 1:].mean(1)), 0)
    spec = hm.trace_spec(m, X)
    assert set(spec.groups["conv"]) == {("conv.weight", 0), ("conv.bias", 0), ("fc.weight", 1)}
    check_head_invariance(m, X, spec)

"""Attention written out by hand (handlers/heads.py), as timm's ViT and research code write it: fused
qkv or separate q/k/v projections, F.scaled_dot_product_attention or softmax(q·kᵀ·scale)·v.

The spec is checked exactly (groups, fused parts, ties) and by invariance: a random head-structured
permutation (tests/head_perms.py: one head map per tie, independent permutations inside each head
for qk and vo) leaves the outputs unchanged, while a permutation that moves one q/k (or v) channel
to another head, or gives qk and vo different head maps, changes them."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge.spec import Tie
from head_perms import check_head_invariance, cross_head_swap, permuted, structured_perms
from test_vision_coverage import randomize

D, H = 32, 4
HD = D // H
X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


class Attention(nn.Module):
    """timm's vision_transformer.Attention, trimmed: fused qkv, optional qk_norm, both attention forms."""

    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True, index=False, norm=nn.LayerNorm):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn, self.index = fused_attn, index
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.index:
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class SeparateAttention(nn.Module):
    """Separate q/k/v projections (HF/research style), v heads possibly wider than q/k heads."""

    def __init__(self, dim, num_heads, fused_attn=True, v_head_dim=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.v_head_dim = v_head_dim or self.head_dim
        self.fused_attn = fused_attn
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, num_heads * self.v_head_dim)
        self.o = nn.Linear(num_heads * self.v_head_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / self.head_dim ** 0.5, dim=-1) @ v
        return self.o(x.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(D), attn
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 48), nn.Linear(48, D)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Token embedding, two pre-norm blocks, final norm, mean pooling, head."""

    def __init__(self, make_attn):
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.blocks = nn.Sequential(*[Block(make_attn()) for _ in range(2)])
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 5)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def vit(make_attn, seed=0):
    torch.manual_seed(seed)
    return randomize(ViT(make_attn), seed)


def _tie(i, qk_units=HD, vo_units=HD):
    return Tie((f"blocks.{i}.attn.qk", f"blocks.{i}.attn.vo"), (qk_units, vo_units))


def _heads_only(ties):
    """The ties without the Q tensors they name (checked on their own below)."""
    return {n: Tie(t.groups, t.head_units) for n, t in ties.items()}


def _changes(model, spec, perms, x=X):
    return not torch.allclose(permuted(model, spec, perms)(x), model(x), rtol=1e-4, atol=1e-4)


def _identity(spec):
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("index", [False, True], ids=["unbind", "index"])
def test_timm_fused_qkv_attention_ties_qk_and_vo_heads(fused_attn, index):
    m = vit(lambda: Attention(D, H, fused_attn=fused_attn, index=index))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties) == {f"blocks.{i}.attn": _tie(i) for i in range(2)}
    qk, vo = "blocks.0.attn.qk", "blocks.0.attn.vo"
    assert spec.sizes[qk] == spec.sizes[vo] == D
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"):
        assert spec.segments[(key, 0)] == ((qk, D, 1), (qk, D, 1), (vo, D, 1))
    assert spec.groups[qk] == []          # q|k live only in the fused axis
    assert spec.groups[vo] == [("blocks.0.attn.proj.weight", 1)]
    assert spec.axis_group("blocks.0.attn.qkv.weight", 1) == spec.axis_group("blocks.0.attn.proj.weight", 0)
    check_head_invariance(m, X, spec)
    # the spec is not vacuous: a q/k or v/o channel moved to another head, or different head maps
    # for qk and vo, change the outputs
    for g in (qk, vo):
        perms = _identity(spec)
        perms[g] = cross_head_swap(D, HD)
        assert _changes(m, spec, perms), g
    perms = _identity(spec)
    perms[qk] = torch.arange(D).roll(HD)          # heads rotated by one for q/k only
    assert _changes(m, spec, perms)


@pytest.mark.parametrize("make", [lambda: Attention(D, H), lambda: SeparateAttention(D, H, fused_attn=False)],
                         ids=["fused", "separate"])
def test_trace_without_example_input_gives_the_same_spec(make):
    """B, N = x.shape[:2] are nodes: the constants after them (and a last -1) split the channels."""
    m = vit(make)
    a, b = hm.trace_spec(m), hm.trace_spec(m, X)
    assert (a.groups, a.segments, a.ties, a.sizes) == (b.groups, b.segments, b.ties, b.sizes)


class Unflatten(Attention):
    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


def test_unflatten_into_heads_and_iterating_over_the_parts():
    m = vit(lambda: Unflatten(D, H))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties) == {f"blocks.{i}.attn": _tie(i) for i in range(2)}
    check_head_invariance(m, X, spec)


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_separate_projections_tie_q_k_rows_and_v_rows_with_o_columns(fused_attn):
    m = vit(lambda: SeparateAttention(D, H, fused_attn=fused_attn))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties) == {f"blocks.{i}.attn": _tie(i) for i in range(2)}
    p = "blocks.1.attn"
    assert sorted(spec.groups[f"{p}.qk"]) == [(f"{p}.k.weight", 0), (f"{p}.q.bias", 0), (f"{p}.q.weight", 0)]
    assert sorted(spec.groups[f"{p}.vo"]) == [(f"{p}.o.weight", 1), (f"{p}.v.bias", 0), (f"{p}.v.weight", 0)]
    assert not spec.segments
    check_head_invariance(m, X, spec)
    perms = _identity(spec)
    perms[f"{p}.qk"] = cross_head_swap(D, HD)
    assert _changes(m, spec, perms)


def test_v_heads_wider_than_qk_heads_tie_with_their_own_head_size():
    m = vit(lambda: SeparateAttention(D, H, v_head_dim=12))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties)["blocks.0.attn"] == _tie(0, HD, 12)
    assert spec.sizes["blocks.0.attn.vo"] == H * 12
    check_head_invariance(m, X, spec)


def test_a_norm_on_q_alone_makes_whole_heads_the_qk_units():
    def make():
        a = Attention(D, H, qk_norm=True)
        a.k_norm = nn.Identity()
        return a
    m = vit(make)
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties)["blocks.0.attn"] == _tie(0, 1, HD)
    check_head_invariance(m, X, spec)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_qk_norm_makes_whole_heads_the_qk_units(norm, fused_attn):
    m = vit(lambda: Attention(D, H, qk_norm=True, fused_attn=fused_attn, norm=norm))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties) == {f"blocks.{i}.attn": _tie(i, 1, HD) for i in range(2)}
    qk, vo = "blocks.0.attn.qk", "blocks.0.attn.vo"
    assert spec.sizes[qk] == H and spec.sizes[vo] == D
    assert spec.segments[("blocks.0.attn.qkv.weight", 0)] == ((qk, H, HD), (qk, H, HD), (vo, D, 1))
    # the norms' weights are shared by every head: in no group, but merged with the qkv layer
    layer = next(l for l in spec.layers if l.name == "blocks.0.attn.qkv")
    assert "blocks.0.attn.q_norm.weight" in layer.params.values()
    assert spec.axis_group("blocks.0.attn.q_norm.weight", 0) == "blocks.0.attn.q_norm.weight:0"
    check_head_invariance(m, X, spec)
    # why whole heads: the same permutation inside every head, on the q and k rows alike, would keep
    # q·kᵀ without the norm, but the norm's weight is by position in the head
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    inner = torch.randperm(HD, generator=torch.Generator().manual_seed(3))
    rows = torch.cat([h * HD + inner for h in range(2 * H)])     # the q and k parts
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"):
        sd[key][: 2 * D] = sd[key][: 2 * D][rows]
    m2 = copy.deepcopy(m)
    m2.load_state_dict(sd)
    assert not torch.allclose(m2(X), m(X), rtol=1e-4, atol=1e-4)
    m.blocks[0].attn.q_norm, m.blocks[0].attn.k_norm = nn.Identity(), nn.Identity()
    m2.blocks[0].attn.q_norm, m2.blocks[0].attn.k_norm = nn.Identity(), nn.Identity()
    torch.testing.assert_close(m2(X), m(X), rtol=1e-5, atol=1e-5)


class MaskedAttention(Attention):
    def forward(self, x, mask):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            x = ((q @ k.transpose(-2, -1)) * self.scale + mask).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_a_mask_the_same_for_every_head_is_followed(fused_attn):
    torch.manual_seed(0)
    m = randomize(MaskedAttention(D, H, fused_attn=fused_attn))
    mask = torch.randn(2, 1, 5, 5)
    spec = hm.trace_spec(m, (torch.randn(2, 5, D), mask))
    assert _heads_only(spec.ties) == {"attn": Tie(("attn.qk", "attn.vo"), (HD, HD))}   # the root module: "attn"
    x = torch.randn(2, 5, D)
    perms = structured_perms(spec, 0)
    torch.testing.assert_close(permuted(m, spec, perms)(x, mask), m(x, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(hm.SpecError, match="differs per head"):
        hm.trace_spec(m, (torch.randn(2, 5, D), torch.randn(2, H, 5, 5)))


class CausalAttention(Attention):
    """The explicit form's usual variations: a scale from q's size, a learned scalar temperature, a
    causal mask buffer, contiguous().view(B, N, -1)."""

    def __init__(self, dim, num_heads, temperature_shape=(1,)):
        super().__init__(dim, num_heads, fused_attn=False)
        self.temperature = nn.Parameter(torch.ones(temperature_shape))
        self.register_buffer("causal", torch.tril(torch.ones(5, 5, dtype=torch.bool)))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5 * self.temperature.exp()
        attn = attn.masked_fill(~self.causal, float("-inf"))
        x = (F.softmax(attn, dim=-1) @ v).transpose(1, 2).contiguous().view(B, N, -1)
        return self.proj(x)


def test_explicit_attention_with_size_scale_temperature_and_causal_mask():
    m = vit(lambda: CausalAttention(D, H))
    spec = hm.trace_spec(m, X)
    assert _heads_only(spec.ties) == {f"blocks.{i}.attn": _tie(i) for i in range(2)}
    # the temperature is merged with the qkv layer, in no group
    layer = next(l for l in spec.layers if l.name == "blocks.0.attn.qkv")
    assert "blocks.0.attn.temperature" in layer.params.values()
    assert spec.axis_group("blocks.0.attn.temperature", 0) == "blocks.0.attn.temperature:0"
    check_head_invariance(m, X, spec)


def test_a_per_head_temperature_is_refused():
    m = vit(lambda: CausalAttention(D, H, temperature_shape=(H, 1, 1)))
    m(X)
    with pytest.raises(hm.SpecError, match=r"module 'blocks\.0\.attn'.*\(4, 1, 1\) differs per head"):
        hm.trace_spec(m, X)


# -- refused patterns -----------------------------------------------------------------------------

class GQA(SeparateAttention):
    def __init__(self, dim, num_heads, kv_heads, how):
        super().__init__(dim, num_heads)
        self.kv_heads, self.how = kv_heads, how
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.num_heads // self.kv_heads
        if self.how == "repeat_interleave":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        elif self.how == "repeat_kv":   # Hugging Face's
            k = k[:, :, None].expand(B, self.kv_heads, rep, N, self.head_dim).reshape(B, self.num_heads, N, -1)
            v = v[:, :, None].expand(B, self.kv_heads, rep, N, self.head_dim).reshape(B, self.num_heads, N, -1)
        x = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.how == "enable_gqa")
        return self.o(x.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("how", ["repeat_interleave", "repeat_kv", "enable_gqa"])
def test_grouped_query_attention_is_refused_naming_the_module(how):
    m = vit(lambda: GQA(D, H, 2, how))
    m(X)   # a working model
    with pytest.raises(hm.SpecError, match=r"module 'blocks\.0\.attn'.*grouped-query attention"):
        hm.trace_spec(m, X)


class Rotary(SeparateAttention):
    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        q = torch.cat((-q[..., self.head_dim // 2:], q[..., : self.head_dim // 2]), dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.o(x.transpose(1, 2).flatten(2))


class NoTranspose(Attention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).reshape(B, N, C))   # heads and tokens mixed


class HeadBias(Attention):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads, fused_attn=False)
        self.rel_bias = nn.Parameter(torch.randn(num_heads, 5, 5))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) + self.rel_bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class HeadSoftmax(Attention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(1)      # over the heads
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class QkvTwice(Attention):
    def forward(self, x):
        B, N, C = x.shape
        h = self.qkv(x)
        q, k, v = h.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)) + h[..., :C]


class SharedKV(SeparateAttention):
    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.v(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("make, match", [
    (lambda: Rotary(D, H), r"node 'getitem.*module 'blocks\.0\.attn'.*slicing heads"),
    (lambda: NoTranspose(D, H), r"module 'blocks\.0\.attn'.*merges the dims .*laid out \('x', 'head', 'x', 'hd'\)"),
    (lambda: HeadBias(D, H), r"module 'blocks\.0\.attn'.*differs per head"),
    (lambda: HeadSoftmax(D, H), r"module 'blocks\.0\.attn'.*softmax over dim 1"),
    (lambda: QkvTwice(D, H), r"module 'blocks\.0\.attn'.*also read by other nodes"),
    (lambda: SharedKV(D, H), r"module 'blocks\.0\.attn'.*v's channels are also q's or k's"),
], ids=["rotary_slicing", "merge_without_transpose", "per_head_bias", "softmax_over_heads", "qkv_read_twice",
        "k_is_v"])
def test_unsupported_attention_patterns_are_refused_naming_the_node(make, match):
    m = vit(make)
    m(X)
    with pytest.raises(hm.SpecError, match=match):
        hm.trace_spec(m, X)


def test_register_handler_value_must_be_a_class():
    with pytest.raises(TypeError, match="value=3 is not a class"):
        hm.register_handler("softmax", value=3)


def test_an_op_without_a_heads_handler_names_the_kind_of_value():
    class Gelu(Attention):
        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.gelu(F.scaled_dot_product_attention(q, k, v)).transpose(1, 2).reshape(B, N, C))

    with pytest.raises(hm.SpecError, match=r"node 'gelu'.*not followed on a tensor split into attention heads"):
        hm.trace_spec(vit(lambda: Gelu(D, H)), X)


@pytest.mark.parametrize("order", ["qkv", "kqv"])
def test_ties_name_the_q_rows_where_the_softmax_scale_folds(order):
    """Tie.queries: the rows that make q, the part of a fused qkv that q is taken from, or a separate
    q projection's weight and bias."""
    class Reordered(Attention):
        def forward(self, x):
            B, N, C = x.shape
            parts = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, q, v = parts.unbind(0) if order == "kqv" else (parts[1], parts[0], parts[2])
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    spec = hm.trace_spec(vit(lambda: Reordered(D, H)), X)
    part = 1 if order == "kqv" else 0
    assert spec.ties["blocks.0.attn"].queries == (("blocks.0.attn.qkv.weight", 0, part),
                                                  ("blocks.0.attn.qkv.bias", 0, part))
    spec = hm.trace_spec(vit(lambda: SeparateAttention(D, H, fused_attn=False)), X)
    assert spec.ties["blocks.1.attn"].queries == (("blocks.1.attn.q.weight", 0, 0), ("blocks.1.attn.q.bias", 0, 0))


def test_traced_heads_of_another_size_fold_the_softmax_scale_into_the_q_part():
    """4 heads of 8 (base) <- 8 heads of 4 (target), fused qkv: every base head takes one target head
    (4 dims of 8 padded), and at λ = 1 the q part of the merged qkv is the target's, mapped, times
    sqrt(8 / 4); the k and v parts are not scaled."""
    base, target = vit(lambda: Attention(D, H), seed=0), vit(lambda: Attention(D, 2 * H), seed=1)
    res = hm.align(base, target, example_input=X)
    qk, vo = res.maps["blocks.0.attn.qk"], res.maps["blocks.0.attn.vo"]
    for m in (qk, vo):
        assert ((m.reshape(H, HD) >= 0).sum(1) == HD // 2).all()
    pp = next(p for p in res.pairing.params if p.base_key == "blocks.0.attn.qkv.weight")
    cols = res.maps[pp.links[1]]                                   # the residual stream's map
    w = target.state_dict()["blocks.0.attn.qkv.weight"]          # [q | k | v, D]
    want = torch.cat([_rows(w[:D], qk) * 2 ** 0.5, _rows(w[D:2 * D], qk), _rows(w[2 * D:], vo)])
    want = _rows(want.T, cols).T
    torch.testing.assert_close(hm.merge(base, target, res, lam=1.0).state_dict()["blocks.0.attn.qkv.weight"], want)


def _rows(rows, m):
    """rows[m] with zero rows where m is -1 (plain indexing, the reference)."""
    out = torch.zeros(len(m), rows.shape[1])
    out[m >= 0] = rows[m[m >= 0]]
    return out

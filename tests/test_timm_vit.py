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
from test_handwritten_attention import Attention
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
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm.models.vision_transformer.VisionTransformer, trimmed (class token, learned position
    embedding, global_pool "token" or "avg")."""

    def __init__(self, dim=32, heads=4, depth=2, hidden=48, global_pool="token", pos_shape=None):
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(dim)
        n = (IMG // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(*(pos_shape or (1, n + 1)), dim) * .02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
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

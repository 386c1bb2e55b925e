"""Shared fixtures for the Python-layer tests: small models trained on offline digits (cached per
session), and the plain torch+scipy reference of weight matching for MLPs (it shares no code with
hm.align; it ships in hetmerge.benchmarks.align so that the benchmarks run from a wheel)."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from hetmerge import data as hd
from hetmerge import models as hmm



@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread on shared 2-core machines (more threads only add
    contention); restored afterwards so other tests see the process's settings."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits(image: bool = False):
    return hd.digits(seed=0, image=image)


@functools.lru_cache(maxsize=None)
def trained_mlp(widths: tuple, seed: int, epochs: int = 20, flip: bool = False) -> nn.Module:
    """MLP 64 -> widths -> 10 trained on digits (flip=True: on left-right mirrored digits)."""
    d = digits()
    X = flipped(d.X_train) if flip else d.X_train
    torch.manual_seed(seed)
    m = hmm.mlp(64, list(widths), 10)
    with one_thread():
        return hmm.train(m, X, d.y_train, epochs=epochs, lr=3e-3, batch_size=64, seed=seed)


@functools.lru_cache(maxsize=None)
def trained_cnn(channels: tuple, seed: int, epochs: int = 4) -> nn.Module:
    d = digits(image=True)
    torch.manual_seed(seed)
    m = hmm.cnn(1, list(channels), 10, (8, 8), bn=True)
    with one_thread():
        return hmm.train(m, d.X_train, d.y_train, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)


def flipped(X: torch.Tensor) -> torch.Tensor:
    """The target domain of the assembly tests: digits mirrored left-right."""
    return X.view(-1, 8, 8).flip(-1).reshape(X.shape)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters (fresh ones are 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# Reference weight matching for plain MLPs (Linear stacks): torch + scipy, no hetmerge code.
# Same algorithm as hm.align(method="weight"): hidden layers solved in the order
# np.random.default_rng(seed).permutation(L - 1) each sweep, maps start by position, stop when a sweep
# gains less than tol (relative) or after max_iter sweeps; maps index target units (-1 = padding).
# ---------------------------------------------------------------------------------------------

# The plain torch+scipy weight-matching reference (padding materialized, scipy's assignment) ships
# with the benchmarks so that an installed wheel can run it; tests use the same independent code.
from hetmerge.benchmarks.align import ref_weight_matching  # noqa: E402, F401


@functools.lru_cache(maxsize=None)
def mnist1d():
    return hd.mnist1d()


@functools.lru_cache(maxsize=None)
def trained_mnist1d_mlp(widths: tuple, seed: int, epochs: int = 15) -> nn.Module:
    d = mnist1d()
    torch.manual_seed(seed)
    m = hmm.mlp(40, list(widths), 10)
    with one_thread():
        return hmm.train(m, d.X_train, d.y_train, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)


# ---------------------------------------------------------------------------------------------
# Models whose layer names the pairing tests need: digit names (plain nn.Sequential) and
# torchvision-style residual stages (layer{s}.{i}).
# ---------------------------------------------------------------------------------------------

def seq_net(widths) -> nn.Sequential:
    """Plain nn.Sequential Linear-ReLU stack: widths [in, h1, ..., out]; its layers are named by
    position in the Sequential: "0", "2", "4", ..."""
    mods = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet with len(blocks) stages: conv1/bn1 stem, layer{s}.{i} BasicBlocks
    (stage s > 1 halves the resolution and changes width through block 0's downsample), average
    pool, fc head. blocks=(2, 2) vs (3, 3) is resnet18 vs a deeper sibling in miniature."""

    def __init__(self, blocks=(2, 2), widths=(8, 12), in_ch: int = 1, out_dim: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for s, (n, w) in enumerate(zip(blocks, widths)):
            layers = [BasicBlock(c if i == 0 else w, w, 1 if s == 0 or i > 0 else 2) for i in range(n)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
            c = w
        self.n_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, out_dim)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for s in range(self.n_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def deepen_with_identity_blocks(model: TinyResNet, blocks) -> TinyResNet:
    """`model` with extra blocks appended to its stages (blocks = new counts per stage) that compute
    the identity: their last BatchNorm has weight = bias = 0, so relu(0 + x) = x for the block's
    input x >= 0 (it comes out of a ReLU). Shared blocks keep `model`'s weights exactly."""
    widths = [getattr(model, f"layer{s + 1}")[0].conv2.out_channels for s in range(model.n_stages)]
    deep = TinyResNet(tuple(blocks), tuple(widths), model.conv1.in_channels, model.fc.out_features)
    deep = randomize_bn(deep, 7)
    state = deep.state_dict()
    state.update(model.state_dict())
    deep.load_state_dict(state)
    with torch.no_grad():
        for s in range(model.n_stages):
            stage = getattr(deep, f"layer{s + 1}")
            for blk in list(stage)[len(getattr(model, f"layer{s + 1}")):]:
                blk.bn2.weight.zero_()
                blk.bn2.bias.zero_()
    return deep.eval()

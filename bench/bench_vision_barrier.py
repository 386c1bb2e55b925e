"""Loss barrier of merging two small vision nets trained from different seeds on sklearn digits
(8×8), unaligned (units by position) vs aligned by weight matching, with BatchNorm statistics
interpolated or re-estimated on training data. Families: MobileNet-style (depthwise-separable
convs, squeeze-and-excitation, BatchNorm) and ConvNeXt-style (depthwise 3×3, channels-last
LayerNorm, Linear pointwise convs, layer scale). Numbers go to docs/vision.md.

    PYTHONPATH=python python bench/bench_vision_barrier.py [--epochs 40] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import hetmerge as hm
from hetmerge import data as hd


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MobileNetish(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.Hardswish())
        self.dw1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                                 nn.Hardswish())
        self.se1 = SqueezeExcite(c, c // 2)
        self.pw1 = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c))
        self.dw2 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1, groups=2 * c, bias=False),
                                 nn.BatchNorm2d(2 * c), nn.Hardswish())
        self.pw2 = nn.Sequential(nn.Conv2d(2 * c, 3 * c, 1, bias=False), nn.BatchNorm2d(3 * c), nn.Hardswish())
        self.head = nn.Linear(3 * c, 10)

    def forward(self, x):
        x = self.pw1(self.se1(self.dw1(self.stem(x))))
        x = self.pw2(self.dw2(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(0.1 * torch.ones(c))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self, c=24, depth=2):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 2, stride=2)
        self.stem_norm = LayerNorm2d(c)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c) for _ in range(depth)])
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem_norm(self.stem(x))).mean((-2, -1))))


def train(make, seed, split, epochs):
    torch.manual_seed(seed)
    m = make()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4)
    n = split.X_train.shape[0]
    for _ in range(epochs):
        m.train()
        for idx in torch.randperm(n).split(64):
            opt.zero_grad()
            F.cross_entropy(m(split.X_train[idx]), split.y_train[idx]).backward()
            opt.step()
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = hd.digits(seed=0, image=True)
    lambdas = torch.linspace(0, 1, 11)
    print("| family | alignment | BN statistics | acc(λ=0) | acc(λ=1) | acc(λ=0.5) | loss barrier | align s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make in (("MobileNet-style", MobileNetish), ("ConvNeXt-style", ConvNeXtish)):
        a, b = (train(make, s, split, args.epochs) for s in args.seeds)
        runs = [("unaligned", None, 0.0)]
        for method, kw in (("weight", {}), ("activation", {"data": split.X_train[:512]})):
            t0 = time.perf_counter()
            res = hm.align(a, b, method=method, **kw)
            runs.append((f"{method} matching", res, time.perf_counter() - t0))
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
        for label, r, t_align in runs:
            for bn in ([False, True] if has_bn else [False]):
                curve = hm.sweep(a, b, r, lambdas, data=(split.X_test, split.y_test),
                                 bn_data=(split.X_train, split.y_train) if bn else None)
                acc = curve.acc
                print(f"| {name} | {label} | {'re-estimated' if bn else 'interpolated' if has_bn else 'none (LayerNorm)'} | "
                      f"{float(acc[0]):.3f} | {float(acc[-1]):.3f} | {float(acc[5]):.3f} | "
                      f"{float(curve.barrier):.3f} | {t_align:.2f} |", flush=True)


if __name__ == "__main__":
    main()

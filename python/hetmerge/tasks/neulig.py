"""NeuLig (Neural Ligand; Wang et al. 2025, "Multi-Level Collaboration in Model Merging"): a learned
router, Portland, gives each input its own mixing coefficients β(x) (a point of the simplex), and the
model for that input is the β-weighted merge of the experts. `merge_tasks(base, experts, "neulig",
data=...)` trains Portland and returns a NeuLigModel.

    Portland     β(x) = softmax(W · u(x) + b), u(x) = concat_t f_{θ_t}(x), standardised per
                 coordinate with the training data's mean and std (kept in the module as buffers:
                 without it, outputs of a few units saturate the softmax within a few Adam steps
                 and Portland collapses onto a few experts); one Linear, zero-initialised, so
                 training starts from the plain average
    merged       f_{θ(x)}(x), θ(x) = θ_0 + scale · Σ_t β_t(x) τ_t  (= Σ_t β_t θ_t at scale 1)
    ensemble     Σ_t β_t(x) f_{θ_t}(x), the prediction-level counterpart
    training     Adam on Portland only (experts frozen), minibatches of `data`:
                 loss = L_b(ensemble) + alpha · L_a(β)
                 L_b: cross-entropy with integer labels y, MSE with float targets, the prediction
                      entropy without labels (semi-supervised), or a user loss(outputs, y)
                 L_a = mean over coordinates of (Σ_t β_t ξ*_t)², ξ_t = θ_t − mean_s θ_s, each tensor
                      divided by the std of its offsets; computed as βᵀ G β with G = Ξ* Ξ*ᵀ / P

The paper's first-order argument: when Σ_t β_t ξ_t = 0 the merged model and the ensemble differ by
O(‖ξ‖²); the gap (merged vs ensemble) is what NeuLigModel.ensemble lets one measure.

Evaluation: per-sample weights differ, so a batch cannot share one weight set. For one Linear layer,
mixing the experts' outputs is exact (W(x)h = Σ β_t W_t h when Σ β_t = 1), but only for the first
layer: after a nonlinearity the experts' hidden states differ from the merged model's, which is why
the merged model is evaluated with its own per-sample weights, torch.func.vmap over functional_call,
in chunks of chunk_size inputs (memory: chunk_size × the parameter count).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .mass import _TensorStore
from .plumbing import work_dtype
from .registry import ModuleContext, register_task_method

__all__ = ["NeuLigModel"]

OPTIONS = {"data": None, "loss": None, "alpha": 1.0, "epochs": 30, "lr": 1e-2, "batch_size": 64,
           "chunk_size": 128}


class NeuLigModel(nn.Module):
    """The base architecture with per-input coefficients β(x) over T experts.

    skeleton: the base (its parameters are θ_0); thetas: the experts' float tensors, stacked [T, *shape];
    portland: nn.Linear(T·D, T) (D = one expert output's size). coefficients(x) -> β [B, T];
    expert_outputs(x) -> [B, T, *out]; ensemble(x); merged_forward(x, beta); forward(x) = merged with β(x).
    history: per epoch {"loss", "boost", "align"} of the training.
    """

    def __init__(self, base: nn.Module, states: list, scale: float, chunk_size: int, out_numel: int):
        super().__init__()
        self.skeleton = copy.deepcopy(base)
        self.scale, self.chunk_size, self.num_tasks = scale, chunk_size, len(states)
        sb = {k: v.detach() for k, v in base.state_dict().items()}
        self.float_keys = [k for k, v in sb.items() if v.is_floating_point()]
        self.thetas = _TensorStore({k: torch.stack([st[k].to(sb[k].dtype) for st in states]) for k in self.float_keys})
        self.portland = nn.Linear(self.num_tasks * out_numel, self.num_tasks)
        self.register_buffer("in_mean", torch.zeros(self.num_tasks * out_numel))
        self.register_buffer("in_std", torch.ones(self.num_tasks * out_numel))
        nn.init.zeros_(self.portland.weight)
        nn.init.zeros_(self.portland.bias)
        self.history: list[dict] = []

    def _base_state(self) -> dict[str, torch.Tensor]:
        return dict(self.skeleton.state_dict(keep_vars=True))

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, *out]: every expert on x (the experts are θ_0's skeleton with θ_t's tensors)."""
        sb = self._base_state()
        outs = []
        for t in range(self.num_tasks):
            st = {**sb, **{k: self.thetas[k][t] for k in self.float_keys}}
            y = functional_call(self.skeleton, st, (x,))
            if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
                raise TypeError("neulig: the model's output must be a tensor with the batch axis first")
            outs.append(y)
        return torch.stack(outs, 1)

    def coefficients(self, x: torch.Tensor, expert_outputs: torch.Tensor | None = None) -> torch.Tensor:
        """β [B, T]: Portland's softmax over the concatenated (standardised) expert outputs."""
        eo = self.expert_outputs(x) if expert_outputs is None else expert_outputs
        u = (eo.reshape(eo.shape[0], -1).to(self.portland.weight.dtype) - self.in_mean) / self.in_std
        return torch.softmax(self.portland(u), -1)

    def ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_t β_t(x) f_{θ_t}(x): the prediction-level combination with the same β."""
        eo = self.expert_outputs(x)
        beta = self.coefficients(x, eo)
        return torch.einsum("bt,bt...->b...", beta.to(eo.dtype), eo)

    def merged_forward(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """f_{θ_i}(x_i) with θ_i = θ_0 + scale · Σ_t beta[i, t] τ_t, per input, in chunks."""
        if not isinstance(beta, torch.Tensor) or beta.shape != (x.shape[0], self.num_tasks):
            raise ValueError(f"beta: expected shape ({x.shape[0]}, {self.num_tasks}) [inputs, experts], got "
                             f"{tuple(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__}")
        sb = self._base_state()
        fixed = {k: v for k, v in sb.items() if k not in self.float_keys}
        s = self.scale

        def one(params, xi):
            return functional_call(self.skeleton, {**params, **fixed}, (xi.unsqueeze(0),)).squeeze(0)

        outs = []
        for i in range(0, x.shape[0], self.chunk_size):
            b = beta[i:i + self.chunk_size]
            params = {}
            for k in self.float_keys:
                th, a = self.thetas[k], sb[k]
                wd = work_dtype(a)
                bb = b.to(wd)
                # θ_0 + s Σ β_t (θ_t − θ_0) = (1 − s Σ β_t) θ_0 + s Σ β_t θ_t: exact for one-hot β at s = 1
                w0 = (1.0 - s * bb.sum(1)).view(-1, *([1] * a.dim()))
                params[k] = (w0 * a.to(wd) + s * torch.einsum("bt,t...->b...", bb, th.to(wd))).to(a.dtype)
            outs.append(vmap(one, in_dims=(0, 0))(params, x[i:i + self.chunk_size]))
        return torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"neulig: x must be a batched tensor [B, ...], got {type(x).__name__}")
        return self.merged_forward(x, self.coefficients(x))


def _split_data(data):
    """(X, y or None) from data = X or (X, y); raises naming what is wrong."""
    if isinstance(data, torch.Tensor):
        X, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        X, y = data
    else:
        raise TypeError("data: expected inputs X [N, ...] or a pair (X, y) of tensors, got "
                        f"{type(data).__name__}{'' if not isinstance(data, (tuple, list)) else f' of {len(data)}'}")
    if X.dim() == 0 or X.shape[0] == 0:
        raise ValueError(f"data: X must hold at least one input along its first axis, got shape {tuple(X.shape)}")
    if y is not None and (y.dim() == 0 or y.shape[0] != X.shape[0]):
        raise ValueError(f"data: y has shape {tuple(y.shape)} but X has {X.shape[0]} inputs; y[i] must be "
                         "the target of X[i]")
    return X, y


def check_options(opts: dict) -> None:
    if opts["data"] is None:
        raise ValueError("data: method 'neulig' trains its router (Portland) on data: pass data=X (unlabeled: "
                         "entropy loss) or data=(X, y) (labels: cross-entropy)")
    _split_data(opts["data"])
    if opts["loss"] is not None and not callable(opts["loss"]):
        raise TypeError(f"loss: expected a callable loss(outputs, y) -> scalar tensor or None, got {opts['loss']!r}")
    for name in ("epochs", "batch_size", "chunk_size"):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    for name, lo_ok in (("alpha", True), ("lr", False)):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and not lo_ok):
            raise ValueError(f"{name}: expected a finite number {'≥ 0' if lo_ok else '> 0'}, got {v!r}")


def alignment_gram(sb: dict, states: list) -> torch.Tensor:
    """G [T, T] with L_a(β) = βᵀ G β = mean over all float coordinates of (Σ_t β_t ξ*_t)²."""
    T = len(states)
    G = torch.zeros(T, T, dtype=torch.float64)
    n = 0
    for k, a in sb.items():
        if not a.is_floating_point() or a.numel() == 0:
            continue
        th = torch.stack([st[k].reshape(-1).to(torch.float64) for st in states])   # [T, n_k]
        xi = th - th.mean(0, keepdim=True)
        sd = xi.std() if xi.numel() > 1 else xi.new_zeros(())
        if sd > 0:   # a tensor no expert moved adds nothing to align
            xi = xi / sd
            G += xi @ xi.T
        n += a.numel()
    return (G / max(n, 1)).to(torch.float32)


def default_loss(outputs: torch.Tensor, y) -> torch.Tensor:
    if y is None:   # semi-supervised: the ensemble's prediction entropy
        logp = torch.log_softmax(outputs, -1)
        return -(logp.exp() * logp).sum(-1).mean()
    if not y.is_floating_point():
        return F.cross_entropy(outputs, y)
    return F.mse_loss(outputs, y.to(outputs.dtype))


@register_task_method("neulig", options=OPTIONS, check=check_options, returns_module=True)
def neulig(base: nn.Module, states: list, ctx: ModuleContext) -> NeuLigModel:
    """A NeuLigModel with Portland trained on data (Adam; boosting + alpha · alignment loss)."""
    opts = ctx.options
    X, y = _split_data(opts["data"])
    loss_fn = opts["loss"] if opts["loss"] is not None else default_loss
    sb = {k: v.detach() for k, v in base.state_dict().items()}
    with torch.no_grad():
        try:
            probe = base(X[:1])
        except Exception as exc:   # the data does not fit the model: say which argument
            raise ValueError(f"data: the base cannot run on X[:1] of shape {tuple(X[:1].shape)}: {exc}") from None
    if not isinstance(probe, torch.Tensor) or probe.dim() == 0 or probe.shape[0] != 1:
        raise TypeError("neulig: the model's output must be a tensor with the batch axis first")
    model = NeuLigModel(base, states, ctx.scale, opts["chunk_size"], probe[0].numel()).to(X.device).eval()
    G = alignment_gram(sb, states).to(X.device)
    with torch.no_grad():   # the experts are frozen: their outputs on the data are computed once
        eo = torch.cat([model.expert_outputs(X[i:i + 512]) for i in range(0, X.shape[0], 512)])
        u = eo.reshape(eo.shape[0], -1).to(model.in_mean.dtype)
        model.in_mean.copy_(u.mean(0))
        sd = u.std(0, unbiased=False)
        model.in_std.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))   # constant coordinates: left as 0
    opt = torch.optim.Adam(model.portland.parameters(), lr=opts["lr"])
    g = torch.Generator().manual_seed(ctx.seed)
    N, bs = X.shape[0], opts["batch_size"]
    for _ in range(opts["epochs"]):
        perm = torch.randperm(N, generator=g).to(X.device)
        tot = {"loss": 0.0, "boost": 0.0, "align": 0.0}
        for i in range(0, N, bs):
            idx = perm[i:i + bs]
            e = eo[idx]
            beta = model.coefficients(None, e)
            ens = torch.einsum("bt,bt...->b...", beta.to(e.dtype), e)
            lb = loss_fn(ens, None if y is None else y[idx])
            la = torch.einsum("bs,st,bt->b", beta, G, beta).mean()
            loss = lb + opts["alpha"] * la
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w = len(idx) / N
            tot["loss"] += w * loss.item()
            tot["boost"] += w * lb.item()
            tot["align"] += w * la.item()
        model.history.append(tot)
    return model

"""MASS, MoErging through Adaptive Subspace Selection (Crisostomi et al. 2025): a data-free router over
low-rank task vectors. Not one set of weights: `merge_tasks(base, experts, "mass")` returns a
MassModel, a module that routes every input.

    first pass   the TSV-merged trunk runs until the input of the routing layer (a Linear), whose
                 features z [B, n] (mean over any token axes) are captured and the pass stopped
    routing      residual_t(z) = ‖z − z V_tᵀ V_t‖² / ‖z‖², V_t [k, n] = the top-k right singular
                 vectors of expert t's task matrix at that layer (the input directions task t
                 changed); each input goes to the top_k tasks with the smallest residuals
    second pass  the inputs routed to the same task set S run together with
                 θ_0 + scale · Σ_{t∈S} τ̂_t, τ̂_t = expert t's TSV-C reconstruction (rank-k per
                 matrix, exact for 1-D tensors and matrices too small to factor; compress.py)

With top_k=1 and scale=1 an input routed to t gets exactly expert t's rank-k reconstruction. Storage:
the base, the TSV trunk and T·k·(m+n) numbers per matrix, independent of any data.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.func import functional_call

from .compress import compress_tasks
from .plumbing import new_module, work_dtype
from .registry import ModuleContext, register_task_method
from .tsv import top_svd, tsv_rank

__all__ = ["MassModel"]

OPTIONS = {"rank": None, "layer": None, "top_k": 1, "trunk_scale": 1.0}


class _Stop(Exception):
    """Raised by the routing hook: the first pass needs nothing after the routing layer's input."""


class _TensorStore(nn.Module):
    """Named tensors as buffers (state-dict names contain dots, buffer names may not), so that the
    factors follow .to(device) and appear in the model's state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._names = {}
        for i, (k, v) in enumerate(tensors.items()):
            self._names[k] = f"b{i}"
            self.register_buffer(f"b{i}", v)

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, self._names[key])

    def __contains__(self, key: str) -> bool:
        return key in self._names


class MassModel(nn.Module):
    """The base architecture routed per input over T low-rank experts (see the module docstring).

    trunk: the TSV-merged model (first pass; also the skeleton run with each task set's weights).
    layer: the routing Linear's name; rank: k of the routing subspaces; top_k; scale.
    route(x) -> (tasks [B, top_k] int64, ascending residual; residuals [B, T]); forward(x) -> the
    outputs of the routed models, in input order; task_state(S) -> the state dict run for task set S.
    """

    def __init__(self, sb: dict[str, torch.Tensor], trunk: nn.Module, compressed, routing: list[torch.Tensor],
                 layer: str, rank: int, top_k: int, scale: float):
        super().__init__()
        self.trunk = trunk
        self.layer, self.rank, self.top_k, self.scale = layer, rank, top_k, scale
        self.num_tasks = len(routing)
        self.keys = list(sb)
        self.base_state = _TensorStore(sb)
        parts = {}
        for t in range(self.num_tasks):   # τ̂_t as factors (matrices) or dense task vectors (the rest)
            for k, (us, vh) in compressed.factors[t].items():
                parts[f"{t}/{k}/us"], parts[f"{t}/{k}/vh"] = us, vh
            for k, e in compressed.dense[t].items():
                parts[f"{t}/{k}/dense"] = (e.to(work_dtype(sb[k])) - sb[k].to(work_dtype(sb[k])))
        self.parts = _TensorStore(parts)
        self.register_buffer("routing_basis", torch.stack(routing))      # [T, k, n], orthonormal rows
        self._features = None
        mod = dict(trunk.named_modules())[layer]
        mod.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if self._features is not None:   # armed by route(): keep the input and stop the pass
            self._features.append(args[0])
            raise _Stop

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tasks [B, top_k] int64, smallest residual first; residuals [B, T] in [0, 1])."""
        self._features = []
        try:
            self.trunk(x)
        except _Stop:
            pass
        finally:
            feats, self._features = self._features, None
        if not feats:
            raise RuntimeError(f"mass: the routing layer {self.layer!r} was not reached by the trunk's forward")
        z = feats[0]
        if z.dtype in (torch.float16, torch.bfloat16):   # residuals near 0 need more than 8 mantissa bits
            z = z.float()
        if z.dim() > 2:   # tokens / positions: one feature vector per input, as the paper's mean pooling
            z = z.reshape(z.shape[0], -1, z.shape[-1]).mean(1)
        V = self.routing_basis.to(z.dtype)
        proj = torch.einsum("bn,tkn->btk", z, V)                        # coordinates in each subspace
        energy = z.pow(2).sum(-1, keepdim=True)                         # [B, 1]
        res = (energy - proj.pow(2).sum(-1)).clamp(min=0) / energy.clamp(min=torch.finfo(z.dtype).tiny)
        tasks = res.topk(self.top_k, dim=1, largest=False).indices
        return tasks, res

    def task_state(self, tasks) -> dict[str, torch.Tensor]:
        """{name: θ_0 + scale · Σ_{t∈tasks} τ̂_t} (non-float tensors: the base's)."""
        out = {}
        for k in self.keys:
            a = self.base_state[k]
            if not a.is_floating_point():
                out[k] = a
                continue
            wd = work_dtype(a)
            acc = a.to(wd).clone()
            for t in tasks:
                if f"{t}/{k}/us" in self.parts:
                    delta = self.parts[f"{t}/{k}/us"].to(wd) @ self.parts[f"{t}/{k}/vh"].to(wd)
                else:
                    delta = self.parts[f"{t}/{k}/dense"].to(wd)
                acc += self.scale * delta.reshape(a.shape)
            out[k] = acc.to(a.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"mass: x must be a batched tensor [B, ...], got {type(x).__name__}")
        tasks, _ = self.route(x)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(tasks.sort(dim=1).values.tolist()):
            groups.setdefault(tuple(row), []).append(i)
        out = None
        for S, idx in groups.items():     # one second pass per task set, not per input
            ii = torch.tensor(idx, device=x.device)
            y = functional_call(self.trunk, self.task_state(S), (x[ii],))
            if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != len(idx):
                raise TypeError("mass: the model's output must be a tensor with the batch axis first")
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[ii] = y
        return out


def _linear_layers(base: nn.Module) -> list[str]:
    return [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n]


def check_options(opts: dict) -> None:
    r = opts["rank"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"rank: expected a positive int (singular components kept per task and matrix) or None, "
                         f"got {r!r}")
    if opts["layer"] is not None and not isinstance(opts["layer"], str):
        raise TypeError(f"layer: expected the name of a Linear submodule (str) or None, got {opts['layer']!r}")
    k = opts["top_k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: expected a positive int (tasks selected per input), got {k!r}")
    s = opts["trunk_scale"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"trunk_scale: expected a finite number (the first pass's TSV scale), got {s!r}")


@register_task_method("mass", options=OPTIONS, check=check_options, returns_module=True)
def mass(base: nn.Module, states: list, ctx: ModuleContext) -> MassModel:
    """A MassModel: data-free routing by subspace residuals over TSV-C experts."""
    from . import merge_task_states   # the package's entry point; imported here to avoid a cycle

    opts = ctx.options
    T = len(states)
    if opts["top_k"] > T:
        raise ValueError(f"top_k: {opts['top_k']} exceeds the number of experts ({T})")
    linears = _linear_layers(base)
    layer = opts["layer"] if opts["layer"] is not None else (linears[0] if linears else None)
    if layer is None:
        raise ValueError("layer: the base has no nn.Linear submodule to route on; MASS projects a Linear "
                         "layer's input features onto each task's right singular vectors")
    if layer not in linears:
        kind = type(dict(base.named_modules())[layer]).__name__ if layer in dict(base.named_modules()) else None
        what = f"is a {kind}, not an nn.Linear" if kind else "is not a submodule of the base"
        raise ValueError(f"layer: {layer!r} {what}; Linear layers: {linears[:8]}{' ...' if len(linears) > 8 else ''}")
    wkey = f"{layer}.weight"
    sb = {k: v.detach() for k, v in base.state_dict().items()}
    if wkey not in sb:
        raise ValueError(f"layer: {layer!r} has no weight in the base's state dict")
    w0 = sb[wkey]
    wd = work_dtype(w0)
    m, n = w0.shape
    k = tsv_rank(m, n, T, opts["rank"])
    routing = [top_svd(st[wkey].to(wd) - w0.to(wd), k)[2] for st in states]   # Vh_t: [k, n]
    with torch.no_grad():
        trunk = new_module(base, merge_task_states(base, states, "tsv", scale=opts["trunk_scale"],
                                                   check_finite=False, rank=opts["rank"]))
    compressed = compress_tasks(sb, states, k=opts["rank"], check_finite=False, non_float="base")
    model = MassModel(sb, trunk, compressed, routing, layer, k, opts["top_k"], ctx.scale)
    return model.eval()

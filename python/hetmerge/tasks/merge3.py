"""MERGE3 (thesis ch. 3: evolutionary merging on consumer hardware): search per-task merge
coefficients c with an evolution strategy, scoring each candidate θ_0 + Σ_t c_t τ_t on a small subset
of the data and estimating its full-data accuracy with item response theory (tasks/irt.py).

    reference   the experts alone (c = e_t), task arithmetic at c = x0 and `reference_models` random c
                are evaluated on ALL items; a 2PL model is fitted to their answers
    subset      `items` items per task, spread over the fitted difficulty range
    search      CMA-ES (the `cma` library) over c in [low, high]^T, `popsize` candidates per
                generation for `generations` generations; each candidate answers the subset only
                (in parallel through `executor`), fitness = mean over tasks of its estimated accuracy
                (estimator "irt"), of its plain subset accuracy ("subset"), or of its accuracy on all
                items ("full": the expensive baseline the estimator replaces)
    result      the base's architecture with the best candidate's weights (one ops.weighted_sum per
                tensor over θ_0, θ_1..θ_T with coefficients 1 − Σc, c_1..c_T); `.merge3` holds the
                coefficients, the search history and how many item evaluations it cost

executor: a concurrent.futures-style executor (``map(fn, iterable)``, results in order) or one of the
zoo's executors (``hetmerge.fleet.make_executor("pool" | "ray", ...)``: candidates become tasks with
retries, results gathered by key). The candidate evaluator is picklable and carries the base, the
experts' states and the subset data, so a process pool or Ray pays that copy per task. None:
evaluated in this process.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import ops
from .irt import estimate_accuracy, fit_2pl, select_items
from .registry import ModuleContext, register_task_method

__all__ = ["Merge3Report", "CandidateEvaluator", "merged_state"]

OPTIONS = {"data": None, "heads": None, "items": 16, "generations": 10, "popsize": 8, "low": 0.0, "high": 1.5,
           "x0": 0.3, "sigma": 0.3, "estimator": "irt", "reference_models": 6, "executor": None}
ESTIMATORS = ("irt", "subset", "full")


@dataclass
class Merge3Report:
    coefficients: list[float]          # c_t of the returned model
    fitness: float                     # its fitness as the search saw it (estimated unless "full")
    full_accuracy: list[float]         # its accuracy per task on all items of `data`
    history: list[float]               # best fitness after each generation
    estimator: str
    subset_size: int                   # items each candidate answers (all items for "full")
    item_evaluations: int              # items forwarded in all: reference fit + search + final check
    candidates: int                    # candidates scored by the search
    reference: dict = field(default_factory=dict)   # the IRT fit's inputs: models and items


def merged_state(base_state: dict, states: list, coeffs) -> dict:
    """{name: θ_0 + Σ_t c_t (θ_t − θ_0)} for float tensors (others: the base's)."""
    c = [float(v) for v in coeffs]
    w = torch.tensor([[1.0 - sum(c), *c]])
    out = {}
    for k, b in base_state.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        xs = [b.detach()] + [s[k].detach() for s in states]
        out[k] = ops.weighted_sum(xs, w.to(torch.float64 if b.dtype == torch.float64 else torch.float32))[0]
    return out


class CandidateEvaluator:
    """Which items a merge θ_0 + Σ c_t τ_t answers correctly, over a fixed item set (picklable)."""

    def __init__(self, base: nn.Module, states: list, data: list, heads, items: list[torch.Tensor] | None):
        self.template = copy.deepcopy(base).eval()
        self.base_state = {k: v.detach() for k, v in base.state_dict().items()}
        self.states = states
        self.heads = heads
        self.data = [(X, y) if items is None else (X[items[t]], y[items[t]]) for t, (X, y) in enumerate(data)]

    def _model(self) -> nn.Module:
        # one copy of the template per thread: loading weights writes into the module, and a thread
        # pool's concurrent calls must not share it (functional_call swaps parameters in place too)
        local = self.__dict__.setdefault("_local", threading.local())
        if not hasattr(local, "model"):
            local.model = copy.deepcopy(self.template)
        return local.model

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __call__(self, coeffs) -> torch.Tensor:
        model = self._model()
        model.load_state_dict(merged_state(self.base_state, self.states, coeffs))
        out = []
        with torch.no_grad():
            for t, (X, y) in enumerate(self.data):
                logits = model(X)
                if self.heads is not None:
                    logits = self.heads[t](logits)
                out.append(logits.argmax(-1) == y)
        return torch.cat(out)


def check_options(opts: dict) -> None:
    data = opts["data"]
    if not isinstance(data, (list, tuple)) or not data or not all(
            isinstance(d, (list, tuple)) and len(d) == 2 and torch.is_tensor(d[0]) and torch.is_tensor(d[1])
            and len(d[0]) == len(d[1]) and len(d[1]) > 0 for d in data):
        raise ValueError("data: merge3 needs a list of (X, y) validation tensors, one non-empty pair per expert")
    if opts["heads"] is not None and (not isinstance(opts["heads"], (list, tuple)) or len(opts["heads"]) != len(data)
                                      or not all(callable(h) for h in opts["heads"])):
        raise ValueError("heads: a list of one callable per expert (applied to the model's output), or None")
    if opts["estimator"] not in ESTIMATORS:
        raise ValueError(f"estimator: one of {ESTIMATORS}, got {opts['estimator']!r}")
    for k in ("items", "generations", "popsize", "reference_models"):
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "reference_models" else 1):
            raise ValueError(f"{k}: expected a positive int, got {v!r}")
    if opts["popsize"] < 2:
        raise ValueError(f"popsize: CMA-ES needs at least 2 candidates per generation, got {opts['popsize']}")
    for k in ("low", "high", "x0", "sigma"):
        if isinstance(opts[k], bool) or not isinstance(opts[k], (int, float)) or not math.isfinite(opts[k]):
            raise ValueError(f"{k}: expected a finite number, got {opts[k]!r}")
    if not opts["low"] < opts["high"] or not opts["low"] <= opts["x0"] <= opts["high"] or opts["sigma"] <= 0:
        raise ValueError(f"low < high, low <= x0 <= high and sigma > 0 are required, got low={opts['low']}, "
                         f"high={opts['high']}, x0={opts['x0']}, sigma={opts['sigma']}")
    if opts["executor"] is not None and not callable(getattr(opts["executor"], "map", None)):
        raise ValueError("executor: expected an object with map(fn, iterable) (e.g. a concurrent.futures executor)")


def _answers(evaluator: "CandidateEvaluator", coeffs: list[float]) -> dict:
    """One candidate as a task of the zoo's executors (hetmerge.fleet): a plain dict back."""
    return {"answers": evaluator(coeffs).tolist()}


def _runner(executor):
    """run(fn, candidates) -> answers in candidate order, for: None (this process), a
    concurrent.futures-style executor (map(fn, iterable), ordered), or the zoo's executors
    (map(fn, [(key, args)]) yielding outcomes as they finish, with retries)."""
    if executor is None:
        return lambda fn, cands: list(map(fn, cands))
    if callable(getattr(executor, "results", None)):
        def run(fn, cands):
            out = {}
            for o in executor.map(_answers, ((i, (fn, c)) for i, c in enumerate(cands))):
                if not o.ok:
                    raise RuntimeError(f"merge3: candidate {cands[o.key]} failed after {o.attempts} attempt(s): "
                                       f"{o.error}")
                out[o.key] = torch.tensor(o.result["answers"], dtype=torch.bool)
            return [out[i] for i in range(len(cands))]
        return run
    return lambda fn, cands: list(executor.map(fn, cands))


def _per_task(answers: torch.Tensor, sizes: list[int]) -> list[float]:
    return [float(a.float().mean()) for a in torch.split(answers, sizes)]


@register_task_method("merge3", options=OPTIONS, check=check_options, returns_module=True)
def merge3(base: nn.Module, states: list, ctx: ModuleContext) -> nn.Module:
    """The base with the weights of the best per-task coefficients found by CMA-ES (IRT-estimated fitness)."""
    try:
        import cma
    except ImportError:
        raise ImportError("merge3 searches with CMA-ES from the `cma` package: pip install cma") from None
    o = ctx.options
    if ctx.scale != 1.0:
        raise ValueError(f"scale: merge3 searches the coefficients themselves; leave scale at 1 (got {ctx.scale})")
    T, data = len(states), list(o["data"])
    if len(data) != T:
        raise ValueError(f"data: {len(data)} (X, y) pairs for {T} experts; give one per expert")
    run = _runner(o["executor"])
    sizes = [len(y) for _, y in data]
    groups = torch.cat([torch.full((n,), t) for t, n in enumerate(sizes)])
    full = CandidateEvaluator(base, states, data, o["heads"], None)
    g = torch.Generator().manual_seed(ctx.seed)
    evaluations = 0

    # reference models on all items, the IRT fit and the subset
    refs = [[1.0 if s == t else 0.0 for s in range(T)] for t in range(T)] + [[o["x0"]] * T]
    refs += (o["low"] + (o["high"] - o["low"]) * torch.rand(o["reference_models"], T, generator=g)).tolist()
    subset, items_model = None, None
    if o["estimator"] != "full":
        answers = torch.stack(list(run(full, refs))).float()
        evaluations += answers.numel()
        items_model, _ = fit_2pl(answers)
        subset = select_items(items_model, groups, o["items"])
    offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
    per_task = None if subset is None else [subset[(subset >= offsets[t]) & (subset < offsets[t + 1])] - offsets[t]
                                            for t in range(T)]
    scorer = full if subset is None else CandidateEvaluator(base, states, data, o["heads"], per_task)
    n_items = sum(sizes) if subset is None else len(subset)
    sub_groups = groups if subset is None else groups[subset]

    def fitness(ans: torch.Tensor) -> float:
        if o["estimator"] == "irt":
            return float(estimate_accuracy(items_model, groups, subset, ans).mean())
        return float(torch.stack([ans[sub_groups == t].float().mean() for t in range(T)]).mean())

    es = cma.CMAEvolutionStrategy([o["x0"]] * T, o["sigma"], {
        "bounds": [o["low"], o["high"]], "popsize": o["popsize"], "seed": ctx.seed + 1, "verbose": -9})
    best_c, best_f, history, candidates = list(refs[T]), -math.inf, [], 0
    for _ in range(o["generations"]):
        cands = [list(map(float, c)) for c in es.ask()]
        fits = [fitness(a) for a in run(scorer, cands)]
        evaluations += n_items * len(cands)
        candidates += len(cands)
        es.tell(cands, [-f for f in fits])
        i = max(range(len(fits)), key=fits.__getitem__)
        if fits[i] > best_f:
            best_c, best_f = cands[i], fits[i]
        history.append(best_f)
    final = full(best_c)
    evaluations += final.numel()
    model = copy.deepcopy(base)
    model.load_state_dict(merged_state({k: v.detach() for k, v in base.state_dict().items()}, states, best_c))
    model.merge3 = Merge3Report(best_c, best_f, _per_task(final, sizes), history, o["estimator"], n_items,
                                evaluations, candidates,
                                {"models": len(refs) if subset is not None else 0, "items": sum(sizes)})
    return model

"""hm.merge_tasks / hm.compress_tasks: each method against a plain reference written here from its
formula (numpy, float64), DARE's drop statistics, TSV invariances, input checks, and parity with
mergekit on tiny Llama checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import hetmerge as hm

# ---------------------------------------------------------------------------------------------
# references (numpy float64, from the formulas in docs/merge_tasks.md; no hetmerge code)
# ---------------------------------------------------------------------------------------------


def np_state(m):
    return {k: (v.detach().double() if v.is_floating_point() else v.detach()).numpy().copy()
            for k, v in m.state_dict().items()}


def ref_task_arithmetic(b, es, s):
    return b + s * sum(e - b for e in es)


def ref_topk(tau, density):
    """τ with all but its max(1, int(density·n)) largest magnitudes zeroed; ties: lowest flat index first."""
    flat = tau.reshape(-1)
    n = flat.size
    k = n if density >= 1 else min(n, max(1, int(density * n)))
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(tau.shape)


def ref_elect(taus, normalize=True):
    """TIES: sign of the sum (+ at 0), then mean (or sum) of the nonzero entries agreeing with it."""
    taus = np.stack(taus)
    elected = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(taus) == elected
    total = (taus * agree).sum(0)
    return total / np.maximum(agree.sum(0), 1) if normalize else total


def ref_ties(b, es, s, density, normalize=True):
    return b + s * ref_elect([ref_topk(e - b, density) for e in es], normalize)


def ref_polar(a):
    P, _, Qh = np.linalg.svd(a, full_matrices=False)
    return P @ Qh


def ref_tsv(b, es, s):
    if b.ndim < 2:
        return ref_task_arithmetic(b, es, s)
    B = b.reshape(b.shape[0], -1)
    m, n = B.shape
    k = max(1, min(m, n) // len(es))
    Us, Ss, Vs = [], [], []
    for e in es:
        U, S, Vh = np.linalg.svd(e.reshape(B.shape) - B, full_matrices=False)
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vh[:k].T)
    U, V = ref_polar(np.concatenate(Us, 1)), ref_polar(np.concatenate(Vs, 1))
    return (B + s * U @ np.diag(np.concatenate(Ss)) @ V.T).reshape(b.shape)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


class Net(nn.Module):
    """A conv kernel (4-D), matrices, biases, a LayerNorm and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc1 = nn.Linear(24, 20)
        self.norm = nn.LayerNorm(20)
        self.fc2 = nn.Linear(20, 5)
        self.register_buffer("steps", torch.tensor(7))


def experts_of(base, T, scale=0.1, seed=1, quantized=False):
    """T copies of base with random deltas; quantized: deltas on a grid of 8 values (many ties in |τ|)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        e = Net()
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                d = torch.randn(p.shape, generator=g)
                if quantized:
                    d = torch.randint(-4, 4, p.shape, generator=g).float() / 8
                p.add_(scale * d)
        out.append(e)
    return out


def base_net(seed=0, quantized=False):
    torch.manual_seed(seed)
    b = Net()
    if quantized:   # dyadic values: every task vector is exact in float32, so ties stay ties
        with torch.no_grad():
            for p in b.parameters():
                p.copy_(torch.randint(-8, 8, p.shape).float() / 4)
    return b


def check_against(merged, ref_state, rtol=1e-5, atol=1e-6):
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v.double(), torch.from_numpy(np.asarray(ref_state[k], np.float64)), rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# the methods against their references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,scale", [(1, 1.0), (3, 0.4), (4, -0.7)])
def test_task_arithmetic_matches_formula(T, scale):
    base = base_net()
    experts = experts_of(base, T)
    merged = hm.merge_tasks(base, experts, "task_arithmetic", scale=scale)
    b, es = np_state(base), [np_state(e) for e in experts]
    check_against(merged, {k: ref_task_arithmetic(b[k], [e[k] for e in es], scale) if b[k].dtype.kind == "f"
                           else b[k] for k in b})


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.29, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_formula_incl_tied_magnitudes(quantized, density, normalize):
    base = base_net(quantized=quantized)
    experts = experts_of(base, 3, quantized=quantized)
    merged = hm.merge_tasks(base, experts, "ties", scale=0.8, density=density, normalize=normalize)
    b, es = np_state(base), [np_state(e) for e in experts]
    ref = {k: ref_ties(b[k], [e[k] for e in es], 0.8, density, normalize) for k in b if k != "steps"}
    check_against(merged, {**ref, "steps": b["steps"]})


def test_ties_keeps_exactly_k_entries_when_magnitudes_tie_at_the_threshold():
    # every |τ| equal: the kept set is the first k entries in flat order, whatever the algorithm
    base = nn.Linear(10, 10, bias=False)
    nn.init.zeros_(base.weight)
    e = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        e.weight.copy_(torch.where(torch.rand(10, 10) < 0.5, 1.0, -1.0))
    merged = hm.merge_tasks(base, [e], "ties", density=0.37)
    kept = merged.weight.reshape(-1) != 0
    assert int(kept.sum()) == 37 and bool(kept[:37].all())
    assert torch.equal(merged.weight.reshape(-1)[:37], e.weight.reshape(-1)[:37])


def test_ties_sign_election_on_a_hand_example():
    # per entry: τ_1, τ_2, τ_3 -> elected sign, mean of the agreeing entries
    base = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(base.weight)
    taus = torch.tensor([[3.0, -1.0, 2.0, 0.0], [-1.0, -1.0, -2.0, 0.0], [-1.0, 4.0, 0.0, 0.0]])
    experts = []
    for t in taus:
        e = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            e.weight.copy_(t[None])
        experts.append(e)
    merged = hm.merge_tasks(base, experts, "ties", density=1.0)
    # sums 1, 2, 0 (+ wins the tie: only the 2 agrees), 0 (nobody: stays 0)
    assert merged.weight.tolist() == [[3.0, 4.0, 2.0, 0.0]]


def _decode_masks(delta, taus):
    """Which of the T=2 task vectors survive in each entry of delta = m_1 τ_1 + m_2 τ_2 (generic τ)."""
    cands = torch.stack([torch.zeros_like(taus[0]), taus[0], taus[1], taus[0] + taus[1]])
    pick = (cands - delta[None]).abs().argmin(0)
    err = (cands - delta[None]).abs().amin(0)
    assert float(err.max()) < 1e-5
    return (pick == 1) | (pick == 3), (pick == 2) | (pick == 3)


def test_dare_drop_rate_rescale_and_independence():
    torch.manual_seed(0)
    n, d = 200_000, 0.3
    base = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(base.weight)
    experts = []
    for _ in range(2):
        e = nn.Linear(n, 1, bias=False)
        with torch.no_grad():
            e.weight.copy_(torch.rand(1, n) + 0.5)
        experts.append(e)
    merged = hm.merge_tasks(base, experts, "dare", density=d, seed=3)
    taus = [e.weight[0].detach() for e in experts]
    m1, m2 = _decode_masks(merged.weight[0].detach() * d, taus)   # survivors are rescaled by exactly 1/d
    sd = math.sqrt(d * (1 - d) / n)
    for m in (m1, m2):
        assert abs(m.float().mean().item() - d) < 5 * sd
    # independent across experts: both kept with probability d²
    assert abs((m1 & m2).float().mean().item() - d * d) < 5 * math.sqrt(d * d * (1 - d * d) / n)


def test_dare_is_reproducible_and_unbiased():
    base = base_net()
    experts = experts_of(base, 3)
    a = hm.merge_tasks(base, experts, "dare", scale=0.5, density=0.4, seed=11)
    b = hm.merge_tasks(base, experts, "dare", scale=0.5, density=0.4, seed=11)
    c = hm.merge_tasks(base, experts, "dare", scale=0.5, density=0.4, seed=12)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    # E[result] = task arithmetic: the mean over N seeds is within 5 standard errors per entry
    N, s, d = 300, 0.5, 0.4
    ta = hm.merge_tasks(base, experts, "task_arithmetic", scale=s).fc1.weight.detach().double()
    runs = torch.stack([hm.merge_tasks(base, experts, "dare", scale=s, density=d, seed=i).fc1.weight.detach().double()
                        for i in range(N)])
    taus = torch.stack([(e.fc1.weight - base.fc1.weight).detach().double() for e in experts])
    se = s * torch.sqrt((taus ** 2).sum(0) * (1 - d) / d / N)
    z = (runs.mean(0) - ta) / se
    assert float(z.abs().max()) < 5.5 and abs(float((z ** 2).mean()) - 1) < 0.2


def test_dare_ties_is_the_dare_drop_then_the_ties_election():
    torch.manual_seed(0)
    base = nn.Linear(300, 40)
    experts = []
    for _ in range(2):
        e = nn.Linear(300, 40)
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p))
        experts.append(e)
    d, s = 0.45, 0.9
    dare = hm.merge_tasks(base, experts, "dare", scale=1.0, density=d, seed=5)
    dt = hm.merge_tasks(base, experts, "dare_ties", scale=s, density=d, seed=5)
    for name in ("weight", "bias"):
        b = getattr(base, name).detach().double()
        taus = [getattr(e, name).detach().double() - b for e in experts]
        masks = _decode_masks((getattr(dare, name).detach().double() - b) * d, taus)
        dropped = [(m.double() * t / d).numpy() for m, t in zip(masks, taus)]
        ref = b.numpy() + s * ref_elect(dropped)
        torch.testing.assert_close(getattr(dt, name).detach().double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)


def test_tsv_matches_formula():
    base = base_net()
    experts = experts_of(base, 3)
    merged = hm.merge_tasks(base, experts, "tsv", scale=0.9)
    b, es = np_state(base), [np_state(e) for e in experts]
    ref = {k: ref_tsv(b[k], [e[k] for e in es], 0.9) for k in b if k != "steps"}
    check_against(merged, {**ref, "steps": b["steps"]}, rtol=1e-4, atol=1e-5)


def test_tsv_with_orthogonal_task_subspaces_equals_task_arithmetic():
    torch.manual_seed(0)
    m, n, T = 24, 18, 3
    k = min(m, n) // T
    Q = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    base = nn.Linear(n, m).double()
    experts = []
    for t in range(T):   # τ_t = A_t diag(σ) B_tᵀ on disjoint blocks of orthonormal bases
        tau = Q[:, t * k:(t + 1) * k] @ torch.diag(torch.rand(k, dtype=torch.float64) + 0.5) @ R[:, t * k:(t + 1) * k].T
        e = nn.Linear(n, m).double()
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            e.weight.add_(tau)
            e.bias.add_(torch.randn(m, dtype=torch.float64))
        experts.append(e)
    tsv = hm.merge_tasks(base, experts, "tsv", scale=0.7)
    ta = hm.merge_tasks(base, experts, "task_arithmetic", scale=0.7)
    torch.testing.assert_close(tsv.weight, ta.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tsv.bias, ta.bias, rtol=1e-12, atol=1e-12)


def test_tsv_rank_option_keeps_that_many_components():
    base = base_net()
    experts = experts_of(base, 2)
    # rank 1: the update of fc1 is the orthogonalised pair of top singular directions: rank 2
    merged = hm.merge_tasks(base, experts, "tsv", rank=1)
    assert int(torch.linalg.matrix_rank(merged.fc1.weight - base.fc1.weight, rtol=1e-4)) == 2


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", {"density": 0.3})])
def test_bfloat16_weights_within_bfloat16_rounding(method, kw):
    base = base_net()
    experts = experts_of(base, 3)
    m32 = hm.merge_tasks(base, experts, method, scale=0.5, **kw)
    m16 = hm.merge_tasks(base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts], method, scale=0.5, **kw)
    # reference computed from the same bf16 inputs in float64, rounded once
    b, es = np_state(base.to(torch.bfloat16)), [np_state(e.to(torch.bfloat16)) for e in experts]
    for k, v in m16.state_dict().items():
        if k == "steps":
            continue
        ref = (ref_task_arithmetic(b[k], [e[k] for e in es], 0.5) if method == "task_arithmetic" else
               ref_ties(b[k], [e[k] for e in es], 0.5, 0.3))
        ref16 = torch.from_numpy(ref).to(torch.bfloat16).double()
        ulp = ref16.abs().clamp(min=1e-3) * 2.0 ** -7
        assert v.dtype == torch.bfloat16
        assert bool(((v.double() - ref16).abs() <= ulp + 1e-12).all()), k
    assert m32.fc1.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# TSV-C
# ---------------------------------------------------------------------------------------------


def test_compress_tasks_reconstructs_rank_k_and_counts_bytes():
    base = base_net()
    experts = experts_of(base, 3)
    k = 2
    c = hm.compress_tasks(base, experts, k)
    assert len(c) == 3
    b = np_state(base)
    for t, e in enumerate(experts):
        es = np_state(e)
        rec = c.expert(t).state_dict()
        for key in b:
            if b[key].dtype.kind != "f":
                assert torch.equal(rec[key], base.state_dict()[key])
                continue
            if b[key].ndim >= 2:
                B = b[key].reshape(b[key].shape[0], -1)
                U, S, Vh = np.linalg.svd(es[key].reshape(B.shape) - B, full_matrices=False)
                ref = (B + (U[:, :k] * S[:k]) @ Vh[:k]).reshape(b[key].shape)
            else:
                ref = es[key]
            torch.testing.assert_close(rec[key].double(), torch.from_numpy(ref), rtol=1e-5, atol=1e-5)
    # bytes: conv [6, 18] and fc1 [20, 24], fc2 [5, 20] factored at rank 2; the rest dense; float32
    shapes = {k: v.shape for k, v in base.state_dict().items() if v.is_floating_point()}
    dense = 3 * 4 * sum(math.prod(s) for s in shapes.values())
    fact = {"conv.weight": (6, 18), "fc1.weight": (20, 24), "fc2.weight": (5, 20)}
    comp = 3 * 4 * (sum(k * (m + n) for m, n in fact.values()) +
                     sum(math.prod(s) for key, s in shapes.items() if key not in fact))
    assert (c.bytes_dense, c.bytes_compressed, c.bytes_saved) == (dense, comp, dense - comp)
    assert c.ranks == {key: k for key in fact}


def test_compress_tasks_is_exact_when_k_covers_the_task_rank():
    torch.manual_seed(0)
    base = nn.Linear(40, 30).double()
    e = nn.Linear(40, 30).double()
    e.load_state_dict(base.state_dict())
    with torch.no_grad():
        e.weight.add_(torch.randn(30, 3, dtype=torch.float64) @ torch.randn(3, 40, dtype=torch.float64))
    c = hm.compress_tasks(base, [e], 3)
    torch.testing.assert_close(c.expert(0).weight, e.weight, rtol=1e-10, atol=1e-10)
    assert c.ratio > 4


# ---------------------------------------------------------------------------------------------
# inputs: untouched, validated
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("dare", {"density": 0.5}),
                                       ("dare_ties", {"density": 0.5}), ("tsv", {})])
def test_inputs_untouched_and_result_is_new(method, kw):
    base = base_net()
    experts = experts_of(base, 3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in [base, *experts]]
    merged = hm.merge_tasks(base, experts, method, scale=0.6, **kw)
    for m, snap in zip([base, *experts], before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, snap[k]), k
    assert merged is not base and type(merged) is Net
    for p, q in zip(merged.parameters(), base.parameters()):
        assert p.data_ptr() != q.data_ptr()
    assert int(merged.steps) == 7


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6)
            self.head = nn.Linear(6, 12, bias=False)
            self.head.weight = self.emb.weight

    torch.manual_seed(0)
    base = Tied()
    experts = []
    for _ in range(2):
        e = Tied()
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            e.emb.weight.add_(torch.randn(12, 6))
        experts.append(e)
    merged = hm.merge_tasks(base, experts, "dare", density=0.5, seed=1)
    assert merged.head.weight is merged.emb.weight
    state = hm.tasks.merge_task_states(base, experts, "dare", density=0.5, seed=1)
    assert torch.equal(state["emb.weight"], state["head.weight"])
    assert torch.equal(state["emb.weight"], merged.emb.weight)


def test_bad_inputs_raise_clear_errors():
    base = base_net()
    experts = experts_of(base, 2)
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        hm.merge_tasks(base, experts, "tise", density=0.5)
    with pytest.raises(ValueError, match="did you mean 'task_arithmetic'"):
        hm.merge_tasks(base, experts, "task-arithmetic")
    with pytest.raises(ValueError, match="experts: must not be empty"):
        hm.merge_tasks(base, [], "task_arithmetic")
    with pytest.raises(TypeError, match="experts: expected a list"):
        hm.merge_tasks(base, experts[0], "task_arithmetic")
    for d in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density: must be in \(0, 1\]"):
            hm.merge_tasks(base, experts, "ties", density=d)
    with pytest.raises(ValueError, match="density: method 'dare' needs density"):
        hm.merge_tasks(base, experts, "dare")
    with pytest.raises(ValueError, match="density: method 'tsv' keeps every entry"):
        hm.merge_tasks(base, experts, "tsv", density=0.5)
    with pytest.raises(TypeError, match="normalise: not an option of method 'ties'"):
        hm.merge_tasks(base, experts, "ties", density=0.5, normalise=False)
    with pytest.raises(ValueError, match="rescale: expected one of"):
        hm.merge_tasks(base, experts, "dare", density=0.5, rescale="l2")
    with pytest.raises(ValueError, match="rank: expected a positive int"):
        hm.merge_tasks(base, experts, "tsv", rank=0)
    with pytest.raises(ValueError, match="scale: must be finite"):
        hm.merge_tasks(base, experts, "task_arithmetic", scale=float("inf"))
    with pytest.raises(ValueError, match="k: expected a positive int"):
        hm.compress_tasks(base, experts, 0)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(20, 6)
    with pytest.raises(ValueError, match=r"experts\[1\]\['fc2.weight'\]: shape \(6, 20\) differs"):
        hm.merge_tasks(base, [experts[0], Wider()], "task_arithmetic")
    sd = dict(experts[1].state_dict())
    del sd["norm.bias"]
    with pytest.raises(ValueError, match=r"experts\[1\]: not the base's architecture: it lacks \['norm.bias'\]"):
        hm.merge_tasks(base, [experts[0], sd], "ties", density=0.5)
    sd = dict(experts[1].state_dict(), steps=torch.tensor(9))
    with pytest.raises(ValueError, match=r"experts\[1\]\['steps'\]: non-float tensor .* non_float='base'"):
        hm.merge_tasks(base, [experts[0], sd], "task_arithmetic")
    merged = hm.merge_tasks(base, [experts[0], sd], "task_arithmetic", non_float="base")
    assert int(merged.steps) == 7
    sd = dict(experts[1].state_dict(), **{"fc1.bias": torch.full((20,), float("nan"))})
    with pytest.raises(ValueError, match=r"experts\[1\]\['fc1.bias'\]: holds non-finite values"):
        hm.merge_tasks(base, [experts[0], sd], "ties", density=0.5)
    sd = dict(experts[1].state_dict(), **{"fc1.bias": torch.zeros(20, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"experts\[1\]\['fc1.bias'\]: dtype torch.int64"):
        hm.merge_tasks(base, [experts[0], sd], "task_arithmetic")


def test_register_task_method_adds_a_method():
    from hetmerge.tasks import register_task_method, task_methods

    @register_task_method("_test_first_expert")
    def first(base, experts, ctx):
        """θ_1, for the test."""
        return experts[0].clone()

    try:
        base = base_net()
        experts = experts_of(base, 2)
        merged = hm.merge_tasks(base, experts, "_test_first_expert")
        assert torch.equal(merged.fc1.weight, experts[0].fc1.weight)
        with pytest.raises(ValueError, match="already registered"):
            register_task_method("ties")(first)
    finally:
        from hetmerge.tasks import registry
        registry._METHODS.pop("_test_first_expert", None)
    assert "_test_first_expert" not in task_methods()


# ---------------------------------------------------------------------------------------------
# parity with mergekit on tiny Llama checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    pytest.importorskip("mergekit")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llamas")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for t in range(2):
        e = transformers.LlamaForCausalLM(cfg)
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        e.save_pretrained(root / f"expert{t}")
    return root


def _mergekit(root, method, out, seed=0, shared=None, per_model=None):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    conf = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(root / "base"), "dtype": "float32",
        "models": [{"model": str(root / f"expert{t}"), "parameters": {"weight": 1.0, **(per_model or {})}}
                   for t in range(2)],
        "parameters": shared or {}})
    run_merge(conf, str(out), MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                                           random_seed=seed))
    from safetensors.torch import load_file
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _hm_models(root):
    from transformers import LlamaForCausalLM
    return (LlamaForCausalLM.from_pretrained(root / "base"),
            [LlamaForCausalLM.from_pretrained(root / f"expert{t}") for t in range(2)])


def _max_ulps(a, b, *inputs):
    """max |a − b| in float32 spacings at the largest magnitude among a, b and the inputs, entry by
    entry (a merged entry may cancel to near 0, so the spacing of the result alone is no scale)."""
    mag = torch.stack([x.abs() for x in (a, b, *inputs)]).amax(0)
    spacing = mag.clamp(min=2.0 ** -126).double() * 2.0 ** -23
    return float(((a.double() - b.double()).abs() / spacing).max())


@pytest.mark.parametrize("method,shared,per_model,kw", [
    ("task_arithmetic", {"lambda": 0.7}, {}, {"scale": 0.7}),
    ("task_arithmetic", {}, {}, {}),
    ("ties", {"lambda": 1.0, "normalize": True}, {"density": 0.3}, {"density": 0.3}),
    ("ties", {"lambda": 0.6}, {"density": 0.55}, {"density": 0.55, "scale": 0.6}),
])
def test_parity_with_mergekit(llamas, tmp_path, method, shared, per_model, kw):
    ref = _mergekit(llamas, method, tmp_path / "mk", shared=shared, per_model=per_model)
    base, experts = _hm_models(llamas)
    ours = hm.merge_tasks(base, experts, method, **kw).state_dict()
    assert set(ref) == set(ours)
    sb, se = base.state_dict(), [e.state_dict() for e in experts]
    worst = max(_max_ulps(ours[k], ref[k], sb[k], *(e[k] for e in se)) for k in ref)
    # same formula, different summation order: a few float32 roundings of the result at most
    assert worst <= 4, worst
    if method == "ties":   # the same entries survive in every tensor
        for k in ref:
            b = base.state_dict()[k]
            assert torch.equal(ours[k] == b, ref[k] == b), k


def test_dare_ties_statistics_match_mergekit(llamas, tmp_path):
    """mergekit's dare_ties (rescale to the L1 norm, sum of agreeing entries) and ours with the same
    options draw different masks; their statistics must agree: kept fraction and L1 norm per tensor."""
    d = 0.4
    ref = _mergekit(llamas, "dare_ties", tmp_path / "mk", seed=0, per_model={"density": d})
    base, experts = _hm_models(llamas)
    ours = hm.merge_tasks(base, experts, "dare_ties", density=d, rescale="l1", normalize=False, seed=0).state_dict()
    dens = hm.merge_tasks(base, experts, "dare_ties", density=d, normalize=False, seed=0).state_dict()
    sb = base.state_dict()
    n = nz_ours = nz_ref = 0
    for k in ref:
        a, b = (ours[k] - sb[k]).double(), (ref[k] - sb[k]).double()
        n += a.numel()
        nz_ours += int((a != 0).sum())
        nz_ref += int((b != 0).sum())
        if a.numel() >= 2000:   # per large tensor: L1 norms within 5 %, with 1/density rescale too
            l1 = float(b.abs().sum())
            assert abs(float(a.abs().sum()) / l1 - 1) < 0.05, k
            assert abs(float((dens[k] - sb[k]).double().abs().sum()) / l1 - 1) < 0.05, k
    # an entry survives when some expert keeps it: 1 − (1 − d)² (minus exact sign cancellations: none)
    p = 1 - (1 - d) ** 2
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(nz_ours / n - p) < tol and abs(nz_ref / n - p) < tol


# ---------------------------------------------------------------------------------------------
# the CLI: hetmerge merge-tasks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_ckpts(tmp_path_factory):
    from hetmerge import models
    from hetmerge.checkpoint import save_state

    d = tmp_path_factory.mktemp("tasks_ckpt")
    torch.manual_seed(0)
    base = models.mlp(64, [48, 48], 10)
    save_state(base.state_dict(), d / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        save_state({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()},
                   d / f"e{t}.safetensors")
    save_state(models.mlp(64, [48, 40], 10).state_dict(), d / "other.safetensors")
    return d


def _cli(capsys, *argv):
    from hetmerge.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.mark.parametrize("method,flags,kw", [
    ("ties", ["--density", "0.5", "--scale", "0.8"], {"density": 0.5, "scale": 0.8}),
    ("dare_ties", ["--density", "0.3", "--seed", "4", "--no-normalize"], {"density": 0.3, "seed": 4, "normalize": False}),
    ("tsv", ["--rank", "3"], {"rank": 3}),
])
def test_cli_merge_tasks_equals_library(mlp_ckpts, tmp_path, capsys, method, flags, kw):
    from hetmerge import models
    from hetmerge.checkpoint import load_state

    out = tmp_path / "m.safetensors"
    code, stdout, _ = _cli(capsys, "merge-tasks", mlp_ckpts / "base.safetensors",
                           *[mlp_ckpts / f"e{t}.safetensors" for t in range(3)], "--method", method, *flags,
                           "-o", out, "-q")
    assert code == 0 and out.exists()

    def load(name):
        m = models.mlp(64, [48, 48], 10)
        m.load_state_dict(load_state(mlp_ckpts / name))
        return m
    want = hm.merge_tasks(load("base.safetensors"), [load(f"e{t}.safetensors") for t in range(3)], method,
                          **kw).state_dict()
    got = load_state(out)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_cli_merge_tasks_errors(mlp_ckpts, tmp_path, capsys):
    from hetmerge.cli import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_USAGE

    b, e0 = mlp_ckpts / "base.safetensors", mlp_ckpts / "e0.safetensors"
    out = tmp_path / "m.safetensors"
    code, _, err = _cli(capsys, "merge-tasks", b, e0, "--method", "tie", "--density", "0.5", "-o", out)
    assert code == EXIT_USAGE and "did you mean 'ties'" in err
    code, _, err = _cli(capsys, "merge-tasks", b, e0, "--method", "ties", "-o", out)
    assert code == EXIT_USAGE and "density: method 'ties' needs density" in err
    code, _, err = _cli(capsys, "merge-tasks", b, e0, "--method", "ties", "--density", "0.5", "--rank", "2", "-o", out)
    assert code == EXIT_USAGE and "rank: not an option of method 'ties'" in err
    code, _, err = _cli(capsys, "merge-tasks", b, e0, mlp_ckpts / "other.safetensors", "--method", "task_arithmetic",
                        "-o", out)
    assert code == EXIT_INCOMPATIBLE and "experts[1]" in err
    code, _, err = _cli(capsys, "merge-tasks", b, tmp_path / "missing.safetensors", "--method", "tsv", "-o", out)
    assert code == EXIT_FILE and "missing.safetensors" in err
    code, _, err = _cli(capsys, "merge-tasks", b, e0, "--method", "tsv", "-o", e0)
    assert code == EXIT_FILE and "overwrite an input" in err
    assert not out.exists()


def test_kth_largest_is_exact_on_large_tensors_incl_ties():
    # the sampled bracket only saves time: the value equals torch.kthvalue's in every case
    from hetmerge.tasks.sparsify import kth_largest

    g = torch.Generator().manual_seed(0)
    n = 3_000_000
    for x in (torch.randn(n, generator=g).abs(), torch.randint(0, 5, (n,), generator=g).float(),
              torch.zeros(n), torch.rand(n, generator=g) ** 8):
        for k in (1, 7, n // 3, n - 1, n):
            assert kth_largest(x, k) == torch.kthvalue(x, n - k + 1).values, k


def test_cli_merge_tasks_plan_file_equals_flags_and_flags_override_it(mlp_ckpts, tmp_path, capsys):
    """A plan with base, experts (relative to the plan's folder), method and options gives the same
    checkpoint as the flags; a flag given beside it wins; bad plans are named."""
    import json

    from hetmerge.checkpoint import load_state
    from hetmerge.cli import EXIT_USAGE

    plan = mlp_ckpts / "plan.json"
    plan.write_text(json.dumps({"base": "base.safetensors", "experts": ["e0.safetensors", "e1.safetensors"],
                                "method": "ties", "density": 0.4, "scale": 0.9}))
    via_plan, via_flags, overridden = tmp_path / "p.safetensors", tmp_path / "f.safetensors", tmp_path / "o.safetensors"
    assert _cli(capsys, "merge-tasks", "--plan", plan, "-o", via_plan, "-q")[0] == 0
    assert _cli(capsys, "merge-tasks", mlp_ckpts / "base.safetensors", mlp_ckpts / "e0.safetensors",
                mlp_ckpts / "e1.safetensors", "--method", "ties", "--density", "0.4", "--scale", "0.9",
                "-o", via_flags, "-q")[0] == 0
    a, b = load_state(via_plan), load_state(via_flags)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert _cli(capsys, "merge-tasks", "--plan", plan, "--density", "0.8", "-o", overridden, "-q")[0] == 0
    c = load_state(overridden)
    assert any(not torch.equal(c[k], a[k]) for k in a)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": "b.safetensors", "experts": ["e.safetensors"], "methd": "ties"}))
    code, _, err = _cli(capsys, "merge-tasks", "--plan", bad, "-o", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "'methd' (did you mean 'method'?)" in err
    code, _, err = _cli(capsys, "merge-tasks", "--method", "ties", "-o", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "give BASE and at least one EXPERT" in err


@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.3}), ("task_arithmetic", {"scale": 0.7}),
                                       ("dare_ties", {"density": 0.5, "seed": 3})])
def test_directory_merge_streams_the_same_tensors(llamas, tmp_path, method, kw):
    """merge_tasks_hf on Hugging Face directories equals merge_tasks on the loaded models, tensor by
    tensor, and the CLI takes directories the same way; the output loads with transformers."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from hetmerge.tasks import merge_tasks_hf

    out = merge_tasks_hf(llamas / "base", [llamas / "expert0", llamas / "expert1"], tmp_path / "m", method, **kw)
    b, es = _hm_models(llamas)
    want = hm.merge_tasks(b, es, method, **kw).state_dict()
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == {k for k in want if k in got} and len(got) >= len(want) - 1
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    assert LlamaForCausalLM.from_pretrained(out) is not None
    flags = [f"--{k}" if k != "scale" else "--scale" for k in kw]
    argv = ["merge-tasks", llamas / "base", llamas / "expert0", llamas / "expert1", "--method", method, "-q",
            "-o", tmp_path / "cli"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    from hetmerge.cli import main
    assert main([str(a) for a in argv]) == 0
    cli = {}
    for f in sorted((tmp_path / "cli").glob("*.safetensors")):
        cli.update(load_file(f))
    assert all(torch.equal(cli[k], got[k]) for k in got)


def test_directory_merge_refuses_other_architectures(llamas, tmp_path):
    import transformers

    from hetmerge.tasks import merge_tasks_hf

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"experts\[1\]\['model.layers.0.mlp.down_proj.weight'\]: shape"):
        merge_tasks_hf(llamas / "base", [llamas / "expert0", tmp_path / "other"], tmp_path / "m", "task_arithmetic")
    assert not (tmp_path / "m").exists()

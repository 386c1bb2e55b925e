"""Input-dependent multi-task merging: MASS (data-free subspace routing) and NeuLig (Portland's per-sample
coefficients), each against a plain torch reference written from the method's formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import hetmerge as hm
from hetmerge.tasks import merge_task_states


def mlp(seed=0, n_in=12, hidden=8, n_out=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def perturbed(base, seed, eps=0.1):
    e = mlp(n_in=base[0].in_features, hidden=base[0].out_features, n_out=base[2].out_features)
    e.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in e.parameters():
            p.add_(eps * torch.randn(p.shape, generator=g))
    return e


def ref_rank_k(tau, k):
    """Best rank-k approximation of a matrix (Eckart–Young), plain torch."""
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def ref_routed_state(base, experts, tasks, scale, ks):
    """θ_0 + scale · Σ_{t∈tasks} τ̂_t; τ̂ = rank-ks[name] approximation for matrices, exact for vectors."""
    sb = base.state_dict()
    out = {}
    for name, a in sb.items():
        acc = a.clone()
        for t in tasks:
            tau = experts[t].state_dict()[name] - a
            acc += scale * (ref_rank_k(tau, ks[name]) if a.dim() == 2 else tau)
        out[name] = acc
    return out


def block_subspace_experts(T=3, block=4, k=2, seed=0):
    """Experts whose first-layer task vector is A_t B_tᵀ with B_t [n_in, k] orthonormal inside input block t."""
    base = mlp(seed, n_in=T * block, hidden=8)
    g = torch.Generator().manual_seed(seed + 1)
    experts, bases = [], []
    for t in range(T):
        B = torch.zeros(T * block, k)
        B[t * block:(t + 1) * block] = torch.linalg.qr(torch.randn(block, k, generator=g))[0]
        e = perturbed(base, seed=10 + t, eps=0.05)
        with torch.no_grad():
            e[0].weight.copy_(base[0].weight + torch.randn(8, k, generator=g) @ B.T)
        experts.append(e)
        bases.append(B)
    return base, experts, bases


# ------------------------------------------------------------------------------------------ MASS


def test_mass_routes_exactly_when_task_vectors_live_in_known_subspaces():
    base, experts, B = block_subspace_experts()
    m = hm.merge_tasks(base, experts, "mass")           # k = ⌊min(8, 12)/3⌋ = 2 = the true rank
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(6, 2, generator=g) @ B[t].T for t in range(3)])
    truth = torch.arange(3).repeat_interleave(6)
    tasks, res = m.route(x)
    assert torch.equal(tasks[:, 0], truth)
    assert res[torch.arange(18), truth].max() < 1e-5                           # inside its own subspace
    others = res.clone()
    others[torch.arange(18), truth] = float("nan")
    assert others.nan_to_num(2.0).min() > 1 - 1e-5                              # orthogonal to the others


def test_mass_output_equals_rank_k_reconstruction_of_the_routed_expert():
    base = mlp(1)
    experts = [perturbed(base, seed=20 + t) for t in range(3)]
    ks = {"0.weight": 2, "2.weight": 1}                 # ⌊min(m, n)/3⌋: both factorisations are smaller
    x = torch.randn(25, 12, generator=torch.Generator().manual_seed(0))
    m = hm.merge_tasks(base, experts, "mass")
    tasks, _ = m.route(x)
    out = m(x)
    assert len(set(tasks[:, 0].tolist())) > 1           # several groups in one batch
    refs = {t: ref_routed_state(base, experts, [t], 1.0, ks) for t in range(3)}
    for i in range(len(x)):
        ref = functional_call(base, refs[int(tasks[i, 0])], (x[i:i + 1],))
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-6)
    # two tasks per input, scaled: θ_0 + 0.7 · (τ̂_a + τ̂_b)
    m2 = hm.merge_tasks(base, experts, "mass", scale=0.7, top_k=2)
    t2, _ = m2.route(x)
    out2 = m2(x)
    refs = {S: ref_routed_state(base, experts, list(S), 0.7, ks) for S in [(0, 1), (0, 2), (1, 2)]}
    for i in range(len(x)):
        ref = functional_call(base, refs[tuple(sorted(t2[i].tolist()))], (x[i:i + 1],))
        torch.testing.assert_close(out2[i:i + 1], ref, rtol=1e-5, atol=1e-6)


def test_mass_routes_a_hidden_layer_on_the_tsv_trunks_features():
    base = mlp(2)
    experts = [perturbed(base, seed=30 + t) for t in range(3)]
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    m = hm.merge_tasks(base, experts, "mass", layer="2", trunk_scale=0.5)
    tasks, res = m.route(x)
    tsv = merge_task_states(base, experts, "tsv", scale=0.5)
    h = torch.relu(x @ tsv["0.weight"].T + tsv["0.bias"])                        # input of layer "2"
    ref = []
    for e in experts:
        Vh = torch.linalg.svd(e[2].weight.detach() - base[2].weight.detach())[2][:1]   # k = ⌊4/3⌋ = 1
        ref.append(((h - h @ Vh.T @ Vh) ** 2).sum(1) / (h ** 2).sum(1))
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(res, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(tasks[:, 0], ref.argmin(1))


def _digits_experts():
    """A 64-32 trunk pretrained on digits and four experts fine-tuned on transformed inputs (mirrored,
    rotated, inverted, pixel-permuted; own heads). An expert fine-tuned on the pretraining data itself
    would barely move, and its small, unstructured task vector explains no input well: MASS routes by
    what each fine-tune changed."""
    from hetmerge.data import digits
    split = digits(seed=0)
    X, y = split.X_train[:600], split.y_train[:600]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    tasks = [lambda v: torch.flip(v.view(-1, 8, 8), (2,)).reshape(-1, 64),
             lambda v: torch.rot90(v.view(-1, 8, 8), 1, (1, 2)).reshape(-1, 64),
             lambda v: 1.0 - v, lambda v: v[:, perm]]
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())

    def fit(model, head, Xs, epochs):
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=5e-3)
        for _ in range(epochs):
            for i in range(0, len(y), 100):
                opt.zero_grad()
                F.cross_entropy(head(model(Xs[i:i + 100])), y[i:i + 100]).backward()
                opt.step()

    fit(trunk, nn.Linear(32, 10), X, 5)
    experts = []
    for t, fx in enumerate(tasks):
        e = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        e.load_state_dict(trunk.state_dict())
        fit(e, nn.Linear(32, 10), fx(X), 4)
        experts.append(e)
    return trunk, experts, [fx(split.X_test) for fx in tasks]


def test_mass_routing_accuracy_on_digits_tasks_is_far_above_chance():
    trunk, experts, Xs = _digits_experts()
    m = hm.merge_tasks(trunk, experts, "mass")
    hits = [(m.route(X)[0][:, 0] == t).float().mean().item() for t, X in enumerate(Xs)]
    assert sum(hits) / 4 > 0.85, hits                   # chance: 0.25; measured 0.95
    assert min(hits) > 0.6, hits                        # mirrored digits are the hardest: 0.79


def test_mass_bad_arguments_name_the_option():
    base = mlp(3)
    experts = [perturbed(base, seed=t) for t in range(2)]
    with pytest.raises(ValueError, match=r"layer: 'nope' is not a submodule"):
        hm.merge_tasks(base, experts, "mass", layer="nope")
    with pytest.raises(ValueError, match=r"layer: '1' is a ReLU, not an nn.Linear"):
        hm.merge_tasks(base, experts, "mass", layer="1")
    with pytest.raises(ValueError, match=r"top_k: 3 exceeds the number of experts \(2\)"):
        hm.merge_tasks(base, experts, "mass", top_k=3)
    with pytest.raises(ValueError, match="top_k: expected a positive int"):
        hm.merge_tasks(base, experts, "mass", top_k=0)
    with pytest.raises(ValueError, match="rank: expected a positive int"):
        hm.merge_tasks(base, experts, "mass", rank=0)
    with pytest.raises(TypeError, match=r"ranks: not an option of method 'mass' \(its options: \['layer', 'rank'"):
        hm.merge_tasks(base, experts, "mass", ranks=2)
    with pytest.raises(ValueError, match="density: method 'mass' keeps every entry"):
        hm.merge_tasks(base, experts, "mass", density=0.5)
    with pytest.raises(ValueError, match="'mass' is input-dependent .* returns a module"):
        merge_task_states(base, experts, "mass")
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="layer: the base has no nn.Linear"):
        hm.merge_tasks(conv, [conv, conv], "mass")
    with pytest.raises(TypeError, match="mass: x must be a batched tensor"):
        hm.merge_tasks(base, experts, "mass")([1.0])


# ---------------------------------------------------------------------------------------- NeuLig


def ref_merged(base, experts, beta, x, scale=1.0):
    """Per input i: the module θ_0 + scale · Σ_t beta[i, t] τ_t, built in a loop and called on x[i]."""
    sb = base.state_dict()
    outs = []
    for i in range(len(x)):
        st = {k: a + scale * sum(beta[i, t] * (e.state_dict()[k] - a) for t, e in enumerate(experts))
              for k, a in sb.items()}
        outs.append(functional_call(base, st, (x[i:i + 1],)))
    return torch.cat(outs)


def _neulig_case(T=3, n=60, eps=0.3):
    base = mlp(4)
    experts = [perturbed(base, seed=40 + t, eps=eps) for t in range(T)]
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 12, generator=g)
    with torch.no_grad():   # labels: expert (i mod T)'s prediction, so the router has something to find
        y = torch.stack([experts[i % T](X[i:i + 1])[0].argmax() for i in range(n)])
    return base, experts, X, y


def test_neulig_one_hot_coefficients_give_each_expert():
    base, experts, X, y = _neulig_case()
    m = hm.merge_tasks(base, experts, "neulig", data=(X, y), epochs=2)
    x = X[:9]
    onehot = torch.eye(3)[torch.arange(9) % 3]
    with torch.no_grad():
        out = m.merged_forward(x, onehot)
        ref = torch.cat([experts[i % 3](x[i:i + 1]) for i in range(9)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_neulig_merged_forward_equals_a_per_sample_loop(scale):
    base, experts, X, y = _neulig_case()
    m = hm.merge_tasks(base, experts, "neulig", data=(X, y), scale=scale, epochs=3, chunk_size=7)
    x = X[:20]
    beta = torch.distributions.Dirichlet(torch.ones(3)).sample((20,))
    with torch.no_grad():
        torch.testing.assert_close(m.merged_forward(x, beta), ref_merged(base, experts, beta, x, scale),
                                   rtol=1e-5, atol=1e-6)
        b = m.coefficients(x)
        torch.testing.assert_close(b.sum(1), torch.ones(20))
        torch.testing.assert_close(m(x), ref_merged(base, experts, b, x, scale), rtol=1e-5, atol=1e-6)
        ens = sum(b[:, t:t + 1] * experts[t](x) for t in range(3))
        torch.testing.assert_close(m.ensemble(x), ens, rtol=1e-5, atol=1e-6)
        # Portland is one Linear over the concatenated expert outputs (standardised with the training
        # data's statistics), then a softmax
        cat = torch.cat([e(x) for e in experts], 1)
        ecat = torch.cat([e(X) for e in experts], 1)
        u = (cat - ecat.mean(0)) / ecat.std(0, unbiased=False)
        torch.testing.assert_close(b, torch.softmax(u @ m.portland.weight.T + m.portland.bias, 1))


def test_neulig_merged_forward_on_a_conv_model_equals_the_loop():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4))
    experts = []
    for t in range(2):
        e = nn.Sequential(nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4))
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.2 * torch.randn_like(p))
        experts.append(e)
    X = torch.randn(10, 1, 8)
    m = hm.merge_tasks(base, experts, "neulig", data=X, epochs=2)   # unlabeled: entropy loss
    beta = torch.distributions.Dirichlet(torch.ones(2)).sample((10,))
    with torch.no_grad():
        torch.testing.assert_close(m.merged_forward(X, beta), ref_merged(base, experts, beta, X),
                                   rtol=1e-5, atol=1e-6)


def test_neulig_training_loss_decreases_and_alignment_is_the_offset_mse():
    base, experts, X, y = _neulig_case(n=90, eps=0.6)
    m = hm.merge_tasks(base, experts, "neulig", data=(X, y), epochs=25, lr=0.05, alpha=0.5)
    h = m.history
    assert len(h) == 25
    assert h[-1]["loss"] < h[0]["loss"] - 0.1 and h[-1]["boost"] < h[0]["boost"] - 0.1   # measured 1.20 -> 1.02
    # L_a(β) = mean over coordinates of (Σ_t β_t ξ*_t)², ξ*_t = (θ_t − mean θ) / std, per tensor
    from hetmerge.tasks.neulig import alignment_gram
    beta = torch.tensor([0.5, 0.3, 0.2])
    tot, n = 0.0, 0
    for k, a in base.state_dict().items():
        th = torch.stack([e.state_dict()[k].reshape(-1) for e in experts]).double()
        xi = (th - th.mean(0)) / (th - th.mean(0)).std()
        tot += ((beta.double() @ xi) ** 2).sum().item()
        n += a.numel()
    G = alignment_gram(base.state_dict(), [e.state_dict() for e in experts])
    assert abs((beta @ G @ beta).item() - tot / n) < 1e-6
    assert abs((torch.ones(3) / 3 @ G @ (torch.ones(3) / 3)).item()) < 1e-6   # the mean is aligned


def test_neulig_bad_arguments_name_the_option():
    base, experts, X, y = _neulig_case(n=12)
    with pytest.raises(ValueError, match="data: method 'neulig' trains its router"):
        hm.merge_tasks(base, experts, "neulig")
    with pytest.raises(TypeError, match="data: expected inputs X"):
        hm.merge_tasks(base, experts, "neulig", data=[1, 2, 3])
    with pytest.raises(ValueError, match=r"data: y has shape \(11,\) but X has 12 inputs"):
        hm.merge_tasks(base, experts, "neulig", data=(X, y[:11]))
    with pytest.raises(ValueError, match=r"data: the base cannot run on X\[:1\] of shape \(1, 5\)"):
        hm.merge_tasks(base, experts, "neulig", data=torch.randn(12, 5))
    with pytest.raises(TypeError, match="loss: expected a callable"):
        hm.merge_tasks(base, experts, "neulig", data=X, loss="ce")
    with pytest.raises(ValueError, match="epochs: expected a positive int, got 0"):
        hm.merge_tasks(base, experts, "neulig", data=X, epochs=0)
    with pytest.raises(ValueError, match=r"lr: expected a finite number > 0"):
        hm.merge_tasks(base, experts, "neulig", data=X, lr=-1.0)
    with pytest.raises(TypeError, match=r"epoch: not an option of method 'neulig'"):
        hm.merge_tasks(base, experts, "neulig", data=X, epoch=3)
    with pytest.raises(ValueError, match="'neulig' is input-dependent"):
        merge_task_states(base, experts, "neulig", data=X)
    m = hm.merge_tasks(base, experts, "neulig", data=X, epochs=1)
    with pytest.raises(ValueError, match=r"beta: expected shape \(12, 3\)"):
        m.merged_forward(X, torch.ones(12, 2) / 2)


def test_cli_merge_tasks_refuses_input_dependent_methods_before_reading(tmp_path, capsys):
    # the CLI writes one state dict; mass / neulig return a routing module: refused at the door (exit 2),
    # the checkpoints are never opened (they do not even exist here)
    from hetmerge.cli import EXIT_USAGE, main

    for method in ("mass", "neulig"):
        code = main(["merge-tasks", str(tmp_path / "b.pt"), str(tmp_path / "e.pt"), "--method", method,
                     "-o", str(tmp_path / "m.safetensors")])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and f"'{method}' is input-dependent" in err and "Traceback" not in err

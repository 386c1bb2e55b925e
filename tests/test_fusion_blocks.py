"""Block matching by function, hm.fuse(blocks="cka") (fusion/blocks.py): linear CKA against its HSIC
definition, the monotone dynamic program against brute force, and planted block insertions and a
planted unmatched block recovered end to end."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import hetmerge as hm  # noqa: E402
from hetmerge.fusion import FusionError, cka_matrix, linear_cka, match_blocks, monotone_match  # noqa: E402

G = torch.Generator().manual_seed(3)
CALIB = torch.randint(0, 40, (8, 16), generator=G)


def hsic_cka(x, y):
    """Reference: CKA = tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X Xᵀ, L = Y Yᵀ, H centering."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    return float(torch.trace(k @ h @ l_ @ h) / torch.sqrt(torch.trace(k @ h @ k @ h) * torch.trace(l_ @ h @ l_ @ h)))


def test_linear_cka_is_the_hsic_definition_and_invariant_to_rotation_and_scale():
    for p, q in [(5, 5), (3, 8), (12, 4)]:
        x = torch.randn(40, p, generator=G, dtype=torch.float64)
        y = x[:, :min(p, q)] @ torch.randn(min(p, q), q, generator=G, dtype=torch.float64) \
            + 0.5 * torch.randn(40, q, generator=G, dtype=torch.float64)
        assert abs(linear_cka(x, y) - hsic_cka(x, y)) < 1e-12
        rot, _ = torch.linalg.qr(torch.randn(q, q, generator=G, dtype=torch.float64))
        assert abs(linear_cka(x, 3.0 * y @ rot + 7.0) - linear_cka(x, y)) < 1e-12
    x = torch.randn(30, 4, generator=G, dtype=torch.float64)
    assert abs(linear_cka(x, x) - 1.0) < 1e-12
    assert linear_cka(x, torch.ones(30, 3, dtype=torch.float64)) == 0.0       # a constant block: no similarity
    s = cka_matrix([x, x[:, :2]], [x, 2 * x])
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0], [hsic_cka(x[:, :2], x)] * 2], dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_t, n_s", [(1, 4), (3, 3), (3, 5), (5, 2), (4, 4)])
def test_monotone_match_is_the_best_order_keeping_map(n_t, n_s):
    for trial in range(20):
        sim = torch.rand(n_t, n_s, generator=G, dtype=torch.float64)
        got = monotone_match(sim)
        assert list(got) == list(range(n_t))
        assert all(got[i] <= got[i + 1] for i in range(n_t - 1))
        # brute force over every non-decreasing map (combinations with replacement, in order)
        best = max(sum(float(sim[i, j]) for i, j in enumerate(c))
                   for c in itertools.combinations_with_replacement(range(n_s), n_t))
        assert abs(sum(float(sim[i, j]) for i, j in got.items()) - best) < 1e-12


def llama(layers, seed=0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


def planted(target, order, perm=None):
    """A Llama whose block k is the target's block order[k], or a pass-through block (o_proj and
    down_proj zero: it adds nothing to the residual stream) where order[k] is None; its residual
    stream permuted by `perm`. It computes the target's function when every target block appears
    once, in order."""
    src = llama(len(order), seed=99)
    sd, tsd = src.state_dict(), target.state_dict()
    for k, v in tsd.items():
        if ".layers." not in k:
            sd[k] = v.clone()
    for k, b in enumerate(order):
        for key in [x for x in sd if x.startswith(f"model.layers.{k}.")]:
            if b is not None:
                sd[key] = tsd[key.replace(f"layers.{k}.", f"layers.{b}.")].clone()
            elif key.endswith(("o_proj.weight", "down_proj.weight")):
                sd[key] = torch.zeros_like(sd[key])
    if perm is not None:
        for k in sd:
            if k.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight",
                           "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                sd[k] = sd[k][:, perm]
            elif k.endswith(("norm.weight", "layernorm.weight", "o_proj.weight", "down_proj.weight")):
                sd[k] = sd[k][perm]
    src.load_state_dict(sd)
    return src


def fine_tune(model, seed, scale=0.05):
    ft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


def logits(m):
    with torch.no_grad():
        return m(input_ids=CALIB[:2]).logits


def test_cka_recovers_planted_inserted_blocks_that_relative_depth_misses():
    target = llama(3)
    perm = torch.randperm(24, generator=G)
    source = planted(target, [None, None, 0, 1, 2], perm)       # two pass-through blocks in front
    torch.testing.assert_close(logits(source), logits(target), atol=1e-5, rtol=0)     # the plant is exact
    assert match_blocks(3, 5) == {0: 0, 1: 2, 2: 4}              # relative depth: wrong
    res = hm.fuse(target, [(source, fine_tune(source, 1))], CALIB, rank=4, blocks="cka")
    assert res.pairs == [{0: 2, 1: 3, 2: 4}]
    # and the transfer of a fine-tune of those blocks is the fine-tune, un-permuted (exact maps)
    ft = fine_tune(source, 2)
    res = hm.fuse(target, [(source, ft)], CALIB, rank=40, blocks="cka", basis="permutation")
    inv = torch.argsort(perm)
    for i in range(3):
        d = (ft.model.layers[i + 2].mlp.down_proj.weight.double()
             - source.model.layers[i + 2].mlp.down_proj.weight.double())
        torch.testing.assert_close(res.deltas[f"model.layers.{i}.mlp.down_proj"], d[inv], atol=1e-12, rtol=0)


def test_cka_pairs_a_source_with_a_dropped_or_a_duplicated_block():
    target = llama(3)
    # source = target blocks 0 and 2 (block 1 dropped): target block 1 has no counterpart; the best
    # order-keeping map keeps 0 -> 0 and 2 -> 1, whatever block 1 takes
    source = planted(target, [0, 2])
    sim_pairs = hm.fuse(target, [(source, fine_tune(source, 3))], CALIB, rank=4, blocks="cka").pairs[0]
    assert sim_pairs[0] == 0 and sim_pairs[2] == 1
    # a duplicated block: the source runs target block 1 twice (as blocks 1 and 2); target block 2
    # pairs with the source's copy of block 2, not with the duplicate
    source = planted(target, [0, 1, 1, 2])
    pairs = hm.fuse(target, [(source, fine_tune(source, 4))], CALIB, rank=4, blocks="cka").pairs[0]
    assert pairs[0] == 0 and pairs[1] in (1, 2) and pairs[2] == 3


def test_blocks_rule_is_checked():
    target = llama(2)
    with pytest.raises(FusionError, match="blocks must be one of"):
        hm.fuse(target, [(target, fine_tune(target, 5))], CALIB, rank=2, blocks="ckaa")
    res = hm.fuse(target, [(target, fine_tune(target, 5))], CALIB, rank=2, blocks="depth")
    assert res.pairs == [{0: 0, 1: 1}]

"""hm.fuse (HeteroFusion, docs/fusion.md) on tiny random Llama / GPT-2 models: the adapter loads with
peft and adds its LoRA formula; a model transferred into itself gives back its fine-tune; a planted
permutation of the target's units is recovered; GPT-2 → Llama end to end; denoising weights; CLI."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import hetmerge as hm  # noqa: E402
from hetmerge.fusion import FusionError, fit_map, match_blocks, topology  # noqa: E402
from hf_models import build  # noqa: E402

G = torch.Generator().manual_seed(7)
CALIB = torch.randint(0, 40, (8, 16), generator=G)       # 128 tokens > every projection's width (≤ 96)
INPUTS = {"input_ids": torch.randint(0, 40, (2, 9), generator=G)}


def canon(model, name):
    """W [out, in] of a module as float64 (Conv1D stores [in, out])."""
    m = model.get_submodule(name)
    w = m.weight.detach().double()
    return w.t() if type(m).__name__ == "Conv1D" else w


def fine_tune(model, seed, scale=0.05, delta=None):
    """A copy of model with every block projection moved by scale·N(0, 1) (or by `delta[name]`)."""
    ft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    names = [p.module for blk in topology(model).blocks for r, p in blk.items() if not r.startswith("norm")]
    with torch.no_grad():
        for name in sorted(set(names)):
            w = ft.get_submodule(name).weight
            w.add_(delta[name] if delta is not None else scale * torch.randn(w.shape, generator=g))
    return ft


def logits(model):
    with torch.no_grad():
        return model(**INPUTS).logits.double()


@pytest.fixture(scope="module")
def llama():
    return build("llama")[0]


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2", seed=1)[0]


def with_lora(model, adapter_dir):
    """Reference: model's weights plus B A (lora_alpha = r: scaling 1) read straight from the files."""
    ref = copy.deepcopy(model)
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for k, a in t.items():
            if ".lora_A." not in k:
                continue
            name = k[len("base_model.model."):-len(".lora_A.weight")]
            d = t[k.replace("lora_A", "lora_B")] @ a
            m = ref.get_submodule(name)
            m.weight.add_(d.t() if type(m).__name__ == "Conv1D" else d)
    return ref


@pytest.mark.parametrize("direction", ["gpt2->llama", "llama->gpt2"])
def test_adapter_loads_with_peft_and_adds_its_lora_formula(tmp_path, llama, gpt2, direction):
    src, tgt = (gpt2, llama) if direction == "gpt2->llama" else (llama, gpt2)
    res = hm.fuse(tgt, [(src, fine_tune(src, 1))], CALIB, rank=3, output=tmp_path / "ad")
    cfg = res.config
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["fan_in_fan_out"] == (tgt is gpt2)
    names = dict(tgt.named_modules())
    assert cfg["target_modules"] and all(n in names for n in cfg["target_modules"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tgt), str(tmp_path / "ad")).eval()
    got, want, before = logits(pm), logits(with_lora(tgt, tmp_path / "ad")), logits(tgt)
    assert (want - before).abs().max() > 1e-3                     # the adapter does something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("basis", ["procrustes", "lstsq"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_self_transfer_at_full_rank_gives_the_fine_tuned_logits(tmp_path, llama, gpt2, family, basis):
    m = llama if family == "llama" else gpt2
    ft = fine_tune(m, 2)
    hm.fuse(m, [(m, ft)], CALIB, rank=96, basis=basis, output=tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(m), str(tmp_path / "ad")).eval()
    change = (logits(ft) - logits(m)).abs().max()
    assert change > 0.1
    assert (logits(pm) - logits(ft)).abs().max() < 1e-3 * change   # measured ~3e-5 of it


def test_self_transfer_truncates_to_the_best_rank_r_update(llama):
    ft = fine_tune(llama, 3)
    res = hm.fuse(llama, [(llama, ft)], CALIB, rank=2, basis="lstsq")
    for name, d in res.deltas.items():
        true = canon(ft, name) - canon(llama, name)
        # o_proj's inputs (GQA heads that attend alike on random weights) are poorly excited: the
        # ridge leaves ~1e-3 of the update there; everything else comes back to ~1e-5
        torch.testing.assert_close(d, true, atol=2e-3 * float(true.abs().max()), rtol=0)
        a = res.tensors[f"base_model.model.{name}.lora_A.weight"].double()
        b = res.tensors[f"base_model.model.{name}.lora_B.weight"].double()
        s = torch.linalg.svdvals(d)
        # Eckart–Young: the best rank-2 error is the norm of the trailing singular values
        assert abs(float((d - b @ a).norm()) - float(s[2:].norm())) < 1e-5 * float(s.norm())


def permuted_llama(m, pr, pm):
    """m with its residual stream permuted by pr and each block's MLP units by pm (same function)."""
    p = copy.deepcopy(m)
    sd = {k: v.clone() for k, v in p.state_dict().items()}
    for k in sd:
        if k.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight")):
            sd[k] = sd[k][:, pr]
        elif k.endswith(("norm.weight", "layernorm.weight", "o_proj.weight")):
            sd[k] = sd[k][pr]
        elif k.endswith(("gate_proj.weight", "up_proj.weight")):
            sd[k] = sd[k][pm][:, pr]
        elif k.endswith("down_proj.weight"):
            sd[k] = sd[k][pr][:, pm]
    p.load_state_dict(sd)
    return p


@pytest.mark.parametrize("basis", ["lstsq", "procrustes", "permutation"])
def test_matcher_recovers_a_planted_permutation_of_the_targets_units(llama, basis):
    g = torch.Generator().manual_seed(11)
    pr, pm = torch.randperm(24, generator=g), torch.randperm(40, generator=g)
    target = permuted_llama(llama, pr, pm)
    torch.testing.assert_close(logits(target), logits(llama), atol=1e-5, rtol=0)   # the plant is exact
    ft = fine_tune(llama, 4)
    res = hm.fuse(target, [(llama, ft)], CALIB, rank=40, basis=basis)
    rows = {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": pr, "gate_proj": pm, "up_proj": pm,
            "down_proj": pr}
    cols = {"q_proj": pr, "k_proj": pr, "v_proj": pr, "o_proj": None, "gate_proj": pr, "up_proj": pr,
            "down_proj": pm}
    assert len(res.deltas) == 14
    for name, d in res.deltas.items():
        kind = name.rsplit(".", 1)[1]
        want = canon(ft, name) - canon(llama, name)
        if rows[kind] is not None:
            want = want[rows[kind]]
        if cols[kind] is not None:
            want = want[:, cols[kind]]
        # permutation maps are exact 0/1 matrices; least squares leaves ~1e-3 in o_proj's poorly
        # excited input directions (see the truncation test)
        tol = 1e-12 if basis == "permutation" else 2e-3
        torch.testing.assert_close(d, want, atol=tol * float(want.abs().max()), rtol=0)


def test_fit_map_permutation_is_the_planted_generalized_permutation():
    x = torch.randn(200, 6, generator=G, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1])          # target has 4 units: source units 3, 0, 5, 1
    want = torch.zeros(4, 6, dtype=torch.float64)
    want[torch.arange(4), perm] = 1
    assert torch.equal(fit_map(x, x[:, perm], "permutation"), want)
    torch.testing.assert_close(fit_map(x, x[:, perm], "lstsq"), want, atol=1e-6, rtol=0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=G, dtype=torch.float64))
    torch.testing.assert_close(fit_map(x, x @ q.T, "procrustes"), q, atol=1e-10, rtol=0)


def test_role_table_splits_gpt2_c_attn_and_blocks_pair_by_relative_depth(gpt2):
    topo = topology(gpt2)
    w = gpt2.transformer.h[1].attn.c_attn.weight          # Conv1D: [in, out = q | k | v]
    for i, r in enumerate("qkv"):
        assert torch.equal(topo.blocks[1][r].weight(gpt2), w.t()[24 * i:24 * (i + 1)])
    assert set(topo.blocks[0]) == {"q", "k", "v", "o", "up", "down", "norm1", "norm2"}
    assert match_blocks(3, 2) == {0: 0, 1: 1, 2: 1}        # round half up: 0.5 -> 1
    assert match_blocks(2, 3) == {0: 0, 1: 2}
    assert match_blocks(3, 5) == {0: 0, 1: 2, 2: 4}
    assert match_blocks(1, 4) == {0: 0}
    assert match_blocks(2, 3, {0: 1}) == {0: 1}


def test_deeper_gpt2_source_into_llama_target_end_to_end(tmp_path, llama):
    import transformers as tf

    torch.manual_seed(5)
    deep = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=3, n_head=4, n_positions=16)).eval()
    res = hm.fuse(llama, [(deep, fine_tune(deep, 6))], CALIB, rank=4, output=tmp_path / "ad")
    assert res.pairs == [{0: 0, 1: 2}]
    # gate has no GPT-2 partner: every other linear role of both target blocks is adapted
    assert sorted(n.rsplit(".", 1)[1] for n in res.deltas) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "up_proj", "down_proj"] * 2)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "ad")).eval()
    out = logits(pm)
    assert torch.isfinite(out).all() and (out - logits(llama)).abs().max() > 1e-4


def test_noisy_source_gets_a_lower_weight_than_agreeing_sources(llama):
    ft = fine_tune(llama, 8)
    names = sorted(n for n in dict(llama.named_modules()) if n.endswith("_proj"))
    true = {n: (canon(ft, n) - canon(llama, n)).float() for n in names}
    g = torch.Generator().manual_seed(9)
    near = fine_tune(llama, 0, delta={n: true[n] + 0.3 * true[n].std() * torch.randn(true[n].shape, generator=g)
                                      for n in names})
    noisy = fine_tune(llama, 10, scale=float(torch.cat([t.flatten() for t in true.values()]).std()))
    res = hm.fuse(llama, [(llama, ft), (llama, near), (llama, noisy)], CALIB, rank=40)
    w, a = res.weights, res.agreement
    assert w[2] < 0.05 and w[2] < w[0] / 10 and w[2] < w[1] / 10
    # reference agreement: cosine of each flattened update with the sum of the others' unit vectors
    vec = [torch.cat([(canon(m, n) - canon(llama, n)).flatten() for n in names]) for m in (ft, near, noisy)]
    unit = [v / v.norm() for v in vec]
    for k in range(3):
        ref = torch.nn.functional.cosine_similarity(vec[k], sum(unit) - unit[k], dim=0)
        assert abs(float(a[k]) - float(ref)) < 1e-4
    # the fused update is closer to the agreed task update than the plain average of the three
    err = sum(float((res.deltas[n] - true[n].double()).norm()) ** 2 for n in names)
    avg = sum(float(((canon(ft, n) + canon(near, n) + canon(noisy, n)) / 3 - canon(llama, n)
                     - true[n].double()).norm()) ** 2 for n in names)
    assert err < 0.5 * avg


def test_lora_adapter_source_is_read_through_peft(tmp_path, llama):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    pmodel = peft.get_peft_model(copy.deepcopy(llama), cfg)
    pmodel.save_pretrained(str(tmp_path / "src"))
    merged = copy.deepcopy(pmodel).merge_and_unload()
    res = hm.fuse(llama, [(llama, str(tmp_path / "src"))], CALIB, rank=2)
    assert sorted(n.rsplit(".", 1)[1] for n in res.deltas) == ["down_proj"] * 2 + ["q_proj"] * 2
    for name, d in res.deltas.items():
        want = canon(merged, name) - canon(llama, name)
        torch.testing.assert_close(d, want, atol=1e-5 * float(want.abs().max()) * 10, rtol=0)


@pytest.mark.parametrize("kw, msg", [({"rank": 0}, "rank must be a positive int"),
                                     ({"basis": "svd"}, "basis must be one of"),
                                     ({"calib": [[1, 2, 99]]}, "vocabulary has 40 tokens"),
                                     ({"calib": [[0.5, 1.0]]}, "calib must be integer token ids"),
                                     ({"sources": []}, "non-empty list"),
                                     ({"density": 0.0}, "density must be in"),
                                     ({"sources": [("a",)]}, r"sources\[0\] must be a")])
def test_bad_inputs_raise_naming_the_argument(llama, kw, msg):
    args = {"calib": CALIB, "rank": 2, "sources": [(llama, llama)], **kw}
    with pytest.raises(FusionError, match=msg):
        hm.fuse(llama, args.pop("sources"), args.pop("calib"), **args)


def test_unknown_family_and_no_update_are_refused(llama):
    bert = build("bert")[0]
    with pytest.raises(FusionError, match="model family 'bert' has no role table"):
        hm.fuse(bert, [(llama, llama)], CALIB, rank=2)
    with pytest.raises(FusionError, match="no source update reached"):
        hm.fuse(llama, [(llama, copy.deepcopy(llama))], CALIB, rank=2)


def test_cli_fuse_writes_a_peft_adapter_and_refuses_output_onto_an_input(tmp_path, llama, gpt2):
    from hetmerge.cli.main import main

    llama.save_pretrained(tmp_path / "t")
    gpt2.save_pretrained(tmp_path / "s")
    fine_tune(gpt2, 12).save_pretrained(tmp_path / "sft")
    ids = ";".join(",".join(str(int(i)) for i in row) for row in CALIB)
    argv = ["fuse", str(tmp_path / "t"), f"{tmp_path / 's'}:{tmp_path / 'sft'}", "--calib", ids, "--rank", "3", "-q"]
    assert main(argv + ["-o", str(tmp_path / "ad")]) == 0
    api = hm.fuse(llama, [(gpt2, fine_tune(gpt2, 12))], CALIB, rank=3)
    files = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(files) == sorted(api.tensors)
    for k, v in api.tensors.items():
        torch.testing.assert_close(files[k], v, atol=1e-5, rtol=1e-4)
    peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "ad"))
    assert main(argv + ["-o", str(tmp_path / "t")]) == 3                  # the target itself
    assert main(argv + ["-o", str(tmp_path / "ad")]) == 3                 # exists, no --force
    assert main(argv + ["--force", "-o", str(tmp_path / "ad")]) == 0
    assert main(["fuse", str(tmp_path / "t"), str(tmp_path / "s"), "--calib", ids, "--rank", "3", "-q",
                 "-o", str(tmp_path / "x")]) == 4                          # no BASE:FT pair
    pair = f"{tmp_path / 's'}:{tmp_path / 'sft'}"
    for calib in ("1,2;3", "some text"):        # ragged ids; text without a tokenizer in TARGET_DIR
        assert main(["fuse", str(tmp_path / "t"), pair, "--calib", calib, "--rank", "3", "-q",
                     "-o", str(tmp_path / "x")]) == 4
    assert not (tmp_path / "x").exists()

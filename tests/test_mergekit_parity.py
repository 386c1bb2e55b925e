"""Parity with mergekit: a plain linear merge (identity alignment, λ = 0.3) of two same-architecture
tiny Llama directories equals mergekit's ``linear`` merge with weights 0.7 / 0.3, tensor by tensor.

mergekit runs in-process through its Python API (``run_merge``), offline, on CPU: the models are
local directories, and the model card (the only step that calls the Hub) is turned off.
Also here: merge_hf's dtype handling against a float64 reference.
"""
from __future__ import annotations

import pytest
import torch

from hetmerge.hf import HFState
from hetmerge.hf_merge import merge_hf
from hf_models import build, outputs


def _mergekit_linear(a, b, out, w_a, w_b, dtype: str):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate({
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": w_a}},
                   {"model": str(b), "parameters": {"weight": w_b}}],
        "dtype": dtype,
    })
    run_merge(cfg, str(out), options=MergeOptions(write_model_card=False, copy_tokenizer=False,
                                                 quiet=True, cuda=False))


@pytest.mark.parametrize("tied", [False, True])
def test_linear_merge_matches_mergekit(tmp_path, monkeypatch, tied):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, inputs = build("llama", seed=0, tied=tied)
    b, _ = build("llama", seed=1, tied=tied)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b", max_shard_size="16KB")
    lam = 0.3
    ours = HFState(merge_hf(tmp_path / "a", tmp_path / "b", tmp_path / "ours", lam=lam))
    _mergekit_linear(tmp_path / "a", tmp_path / "b", tmp_path / "mk", 1 - lam, lam, "float32")
    theirs = HFState(tmp_path / "mk")
    sa, sb = HFState(tmp_path / "a"), HFState(tmp_path / "b")
    assert set(ours) == set(sa)
    for k in ours:
        ref = (1 - lam) * sa[k].double() + lam * sb[k].double()
        torch.testing.assert_close(ours[k].double(), ref, rtol=0, atol=1e-7)    # float32 rounding
        if k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    assert set(theirs) == set(ours)    # a tied head stays one tensor on both sides
    y_ours = outputs(type(a).from_pretrained(tmp_path / "ours").eval(), inputs)
    y_mk = outputs(type(a).from_pretrained(tmp_path / "mk").eval(), inputs)
    torch.testing.assert_close(y_ours, y_mk, rtol=1e-5, atol=1e-5)


def test_bf16_linear_merge_matches_mergekit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, _ = build("llama", seed=0, tied=False)
    b, _ = build("llama", seed=1, tied=False)
    a.to(torch.bfloat16).save_pretrained(tmp_path / "a")
    b.to(torch.bfloat16).save_pretrained(tmp_path / "b")
    lam = 0.3
    ours = HFState(merge_hf(tmp_path / "a", tmp_path / "b", tmp_path / "ours", lam=lam))
    _mergekit_linear(tmp_path / "a", tmp_path / "b", tmp_path / "mk", 1 - lam, lam, "bfloat16")
    theirs = HFState(tmp_path / "mk")
    sa, sb = HFState(tmp_path / "a"), HFState(tmp_path / "b")
    for k in ours:
        assert ours[k].dtype == torch.bfloat16
        ref = (1 - lam) * sa[k].double() + lam * sb[k].double()
        # ours rounds the float32 result once: within half a bf16 ulp of the exact value
        err = (ours[k].double() - ref).abs()
        assert (err <= ref.abs() * 2.0**-8 + 1e-30).all(), k
        torch.testing.assert_close(ours[k], theirs[k], rtol=2.0**-7, atol=1e-6)


def test_mixed_precision_merge_rounds_once_to_the_base_dtype(tmp_path):
    # regression: a bfloat16 base with a float32 target made ops.interpolate refuse the pair
    a, _ = build("llama", seed=0, tied=False)
    b, _ = build("llama", seed=1, tied=False)
    a.to(torch.bfloat16).save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    lam = 0.3
    ours = HFState(merge_hf(tmp_path / "a", tmp_path / "b", tmp_path / "ours", lam=lam))
    sa, sb = HFState(tmp_path / "a"), HFState(tmp_path / "b")
    for k in ours:
        assert ours[k].dtype == torch.bfloat16, k
        ref = ((1 - lam) * sa[k].double() + lam * sb[k].double()).to(torch.bfloat16)
        torch.testing.assert_close(ours[k], ref, rtol=2.0**-7, atol=1e-30)   # one bf16 ulp

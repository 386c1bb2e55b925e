"""hm.align_many on attention models: heads stay whole in the universe (one head map per block for
Q/K and V/O, any order inside a head), planted structured permutations are recovered, and models
whose heads cannot share one universe are refused by name."""
import copy

import pytest
import torch

import hetmerge as hm
from hetmerge.heads import is_structured, random_perms
from hetmerge.maps import permute_state
from hetmerge.transformer_spec import AlignView, transformer_spec
from hf_models import build, outputs

transformers = pytest.importorskip("transformers")


def _vit_copies(n: int):
    """ViT model 0 and n - 1 copies of it under planted structured permutations, with their specs."""
    model, inputs = build("vit", seed=0)
    view = AlignView(model)
    spec = transformer_spec(view)
    views, perms = [view], [None]
    for j in range(1, n):
        p = random_perms(spec, torch.Generator().manual_seed(40 + j))
        pv = copy.deepcopy(view)
        pv.load_state_dict(permute_state(spec, view.state_dict(), p))
        views.append(pv)
        perms.append(p)
    return views, perms, inputs


def test_planted_head_permutations_are_recovered_cycle_consistently():
    views, perms, inputs = _vit_copies(3)
    specs = [transformer_spec(v) for v in views]
    res = hm.align_many(views, specs=specs, seed=0)
    for j in (1, 2):
        al = res.pair(0, j)
        for tie in al.pairing.ties.values():
            assert is_structured(tie, al.maps), tie.name
        for g, p in perms[j].items():
            assert torch.equal(al.maps[g], torch.argsort(p)), (j, g)
        merged = hm.merge(views[0], views[j], al, lam=1.0)
        torch.testing.assert_close(outputs(merged.model, inputs), outputs(views[0].model, inputs),
                                   rtol=1e-5, atol=1e-5)
    # 1 -> 2 composed through the universe equals the direct planted relation
    al12 = res.pair(1, 2)
    for g in perms[1]:
        want = torch.argsort(perms[2][g])[perms[1][g]]
        assert torch.equal(al12.maps[g], want), g


def test_heads_of_different_sizes_cannot_share_a_universe():
    import transformers as tf
    ms = []
    for heads in (4, 2):
        torch.manual_seed(heads)
        cfg = tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                           num_attention_heads=heads, intermediate_size=40, num_labels=5)
        ms.append(AlignView(tf.ViTForImageClassification(cfg).eval()))
    with pytest.raises(ValueError, match="units per head"):
        hm.align_many(ms, specs=[transformer_spec(m) for m in ms])


def test_fused_qkv_is_refused_by_name():
    a, _ = build("gpt2", seed=0)
    b, _ = build("gpt2", seed=1)
    va, vb = AlignView(a), AlignView(b)
    with pytest.raises(ValueError, match="c_attn.*concatenation"):
        hm.align_many([va, vb], specs=[transformer_spec(va), transformer_spec(vb)])


def _llama(hidden: int, heads: int, seed: int):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=4, rms_norm_eps=1e-12,
                         max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


def test_merge_many_pads_a_narrower_llama_exactly():
    """One-hot weights on a narrower model (residual 16 of 24, 4 of 6 heads) give that model's logits
    in the wider frame: heads padded whole and RMSNorm gains rescaled, as hm.merge does."""
    views = [AlignView(_llama(24, 6, 0)), AlignView(_llama(16, 4, 1))]
    ids = {"input_ids": torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))}
    res = hm.align_many(views, method="reference", specs=[transformer_spec(v) for v in views])
    merged = hm.merge_many(views, res, weights=[0.0, 1.0])
    torch.testing.assert_close(outputs(merged.model, ids), outputs(views[1].model, ids), rtol=1e-5, atol=1e-5)

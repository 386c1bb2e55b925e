"""Cross-tokenizer calibration of hm.fuse (fusion/calib.py): TEXT that each model encodes with its own
tokenizer, activation rows paired by common character spans. Tokenizers are built offline with the
`tokenizers` package: a character-level one and a word-level one."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")
from safetensors.torch import load_file  # noqa: E402

import hetmerge as hm  # noqa: E402
from hetmerge.fusion import FusionError, common_spans, encode, record_inputs, text_plans, topology  # noqa: E402

CHARS = "?abcdefghijklmnopqrstuvwxyz ."
WORDS = ["?", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "hat", "."]


def char_tok():
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="?"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), "isolated")
    return t


def word_tok():
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="?"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return t


def text(n_sentences=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_sentences):
        k = int(torch.randint(3, 7, (1,), generator=g))
        out.append(" ".join(WORDS[1 + int(i)] for i in torch.randint(0, len(WORDS) - 2, (k,), generator=g)) + ".")
    return " ".join(out)


def llama(vocab, seed=0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


def gpt2(vocab, seed=1):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=16,
                        bos_token_id=None, eos_token_id=None)
    return tf.GPT2LMHeadModel(cfg).eval()


def fine_tune(model, seed, scale=0.05):
    ft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    names = sorted({p.module for blk in topology(model).blocks for r, p in blk.items() if not r.startswith("norm")})
    with torch.no_grad():
        for name in names:
            w = ft.get_submodule(name).weight
            w.add_(scale * torch.randn(w.shape, generator=g))
    return ft


def test_hand_checked_spans_of_a_character_and_a_word_tokenizer():
    # "the cat sat.": characters end at 1..12; words "the" (3) "cat" (7) "sat" (11) "." (12)
    s = "the cat sat."
    (ci, ce), (wi, we) = encode(char_tok(), s, "target"), encode(word_tok(), s, "source")
    assert ce.tolist() == list(range(1, 13)) and we.tolist() == [3, 7, 11, 12]
    assert wi.tolist() == [1, 2, 3, 13]
    bounds, (cs, ws) = common_spans([ce, we])
    assert bounds.tolist() == [3, 7, 11, 12]
    assert cs.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]     # " cat" belongs to span 1
    assert ws.tolist() == [0, 1, 2, 3]
    # "last": the character model's rows are its positions of "e", "t", "t", "."
    x = torch.arange(12.0)[:, None]
    models = [("target", llama(len(CHARS))), ("source", llama(len(WORDS)))]
    cp, wp = text_plans(s, [char_tok(), word_tok()], models, length=64)
    assert cp.rows(x).flatten().tolist() == [2.0, 6.0, 10.0, 11.0]
    assert wp.rows(x[:4]).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    cp, _ = text_plans(s, [char_tok(), word_tok()], models, length=64, pool="mean")
    assert cp.rows(x).flatten().tolist() == [1.0, 4.5, 8.5, 11.0]


def test_spans_where_token_ends_rarely_coincide():
    # two sub-word splits of 9 characters: common ends 3 and 7; tokens after 7 in only one model
    a, b = torch.tensor([2, 3, 5, 7, 9]), torch.tensor([1, 3, 4, 7, 8])
    bounds, (sa, sb) = common_spans([a, b])
    assert bounds.tolist() == [3, 7]
    assert sa.tolist() == [0, 0, 1, 1, -1] and sb.tolist() == [0, 0, 1, 1, -1]


def test_chunks_stay_within_length_and_read_the_same_characters():
    s = text(20)
    (ci, ce), (wi, we) = encode(char_tok(), s, "t"), encode(word_tok(), s, "s")
    models = [("target", llama(len(CHARS))), ("source", llama(len(WORDS)))]
    cp, wp = text_plans(s, [char_tok(), word_tok()], models, length=12)
    assert len(cp.batches) == len(wp.batches) > 1
    pos_c = pos_w = 0
    for bc, bw in zip(cp.batches, wp.batches):
        assert bc.shape[1] <= 12 and bw.shape[1] <= 12
        # both models' chunks end at the same character: a common boundary
        assert int(ce[pos_c + bc.shape[1] - 1]) == int(we[pos_w + bw.shape[1] - 1])
        assert torch.equal(bc[0], ci[pos_c:pos_c + bc.shape[1]]) and torch.equal(bw[0], wi[pos_w:pos_w + bw.shape[1]])
        pos_c, pos_w = pos_c + bc.shape[1], pos_w + bw.shape[1]
    assert cp.n_rows == wp.n_rows == len(common_spans([ce, we])[0])


def test_a_span_longer_than_calib_length_is_skipped_and_the_next_chunk_starts_after_it():
    # A ends a token at every character of "abcdefg"; B reads "ab" | "cdef" | "g": the span (2, 6]
    # holds 4 tokens of A > length 3, so it is left out and reading restarts at (6, 7]
    a = lambda t: (list(range(7)), list(range(1, 8)))          # noqa: E731
    b = lambda t: ([0, 1, 2], [2, 6, 7])                       # noqa: E731
    models = [("target", llama(len(CHARS))), ("source", llama(len(WORDS)))]
    pa, pb = text_plans("abcdefg", [a, b], models, length=3)
    assert [x.tolist() for x in pa.batches] == [[[0, 1]], [[6]]] and [x.tolist() for x in pb.batches] == [[[0]], [[2]]]
    x = torch.arange(3.0)[:, None]
    assert pa.n_rows == pb.n_rows == 2
    assert pa.rows(x).flatten().tolist() == [1.0, 2.0] and pb.rows(x[:2]).flatten().tolist() == [0.0, 1.0]


def test_paired_rows_are_the_hidden_states_at_the_hand_checked_positions():
    s = "the cat sat on a mat. the dog ran."
    tgt, src = llama(len(CHARS)), gpt2(len(WORDS))
    cp, wp = text_plans(s, [char_tok(), word_tok()], [("target", tgt), ("source", src)], length=16)
    for model, plan, tok, first_norm in [(tgt, cp, char_tok(), "model.layers.0.input_layernorm"),
                                         (src, wp, word_tok(), "transformer.h.0.ln_1")]:
        ids, ends = encode(tok, s, "m")
        common = torch.tensor(sorted(set(encode(char_tok(), s, "t")[1].tolist())
                                     & set(encode(word_tok(), s, "s")[1].tolist())))
        # reference: every chunk run on its own; the row of a boundary is the token ending there
        got = plan.rows(record_inputs(model, topology(model), plan.batches)[first_norm])
        want, pos = [], 0
        for b in plan.batches:
            with torch.no_grad():
                h = model(input_ids=b, output_hidden_states=True).hidden_states[0][0].double()
            for k in range(b.shape[1]):
                last = pos + k + 1 == len(ends) or ends[pos + k + 1] != ends[pos + k]
                if int(ends[pos + k]) in common.tolist() and last:
                    want.append(h[k])
            pos += b.shape[1]
        torch.testing.assert_close(got, torch.stack(want), atol=0, rtol=0)


def test_text_calib_with_one_tokenizer_equals_the_same_ids():
    s = text(30)
    ids, _ = encode(char_tok(), s, "t")
    n = len(ids) // 16 * 16
    s = s[:n]                                    # whole windows of 16 characters
    tgt, src = llama(len(CHARS)), gpt2(len(CHARS))
    ft = fine_tune(src, 3)
    by_ids = hm.fuse(tgt, [(src, ft)], ids[:n].view(-1, 16), rank=4)
    by_text = hm.fuse(tgt, [(src, ft)], s, rank=4, tokenizers=char_tok(), calib_length=16)
    assert sorted(by_ids.deltas) == sorted(by_text.deltas)
    for k, d in by_ids.deltas.items():
        torch.testing.assert_close(by_text.deltas[k], d, atol=1e-10, rtol=0)


def test_cross_tokenizer_transfer_uses_the_span_paired_rows():
    s = text(40)
    tgt, src = llama(len(CHARS)), gpt2(len(WORDS))
    ft = fine_tune(src, 4)
    res = hm.fuse(tgt, [(src, ft)], s, rank=4, tokenizers=[char_tok(), word_tok()], calib_length=16)
    assert res.pairs == [{0: 0, 1: 2}] and len(res.deltas) == 12
    # reference for q of target block 0 <- source block 0: rows picked by hand (the token that ends
    # at each common boundary), the chunks' hidden states from output_hidden_states, Procrustes U Vᵀ
    ce, we = encode(char_tok(), s, "t")[1], encode(word_tok(), s, "s")[1]
    common = set(ce.tolist()) & set(we.tolist())
    cp, wp = text_plans(s, [char_tok(), word_tok()], [("t", tgt), ("s", src)], 16)

    def block0_input(model, plan, ends):
        h = []
        for b in plan.batches:
            with torch.no_grad():
                h.append(model(input_ids=b, output_hidden_states=True).hidden_states[0][0].double())
        h = torch.cat(h)
        return h[[i for i in range(len(h)) if int(ends[i]) in common]]

    def normed(model, name, h):
        return model.get_submodule(name)(h.float()).double()

    ht, hs = block0_input(tgt, cp, ce), block0_input(src, wp, we)
    assert len(ht) == len(hs) == cp.n_rows
    wq_t = tgt.model.layers[0].self_attn.q_proj.weight.double()
    wq_s = src.transformer.h[0].attn.c_attn.weight.t()[:32].double()
    xt, xs = normed(tgt, "model.layers.0.input_layernorm", ht), normed(src, "transformer.h.0.ln_1", hs)

    def procrustes(x, y):                     # M with y ≈ x Mᵀ, orthogonal
        u, _, vh = torch.linalg.svd(y.T @ x, full_matrices=False)
        return u @ vh
    m_in, m_out = procrustes(xt, xs), procrustes(hs @ wq_s.T, ht @ wq_t.T)
    d_s = ft.transformer.h[0].attn.c_attn.weight.t()[:32].double() - wq_s
    torch.testing.assert_close(res.deltas["model.layers.0.self_attn.q_proj"], m_out @ d_s @ m_in,
                               atol=1e-5 * float(d_s.abs().max()), rtol=0)


def test_cli_fuse_reads_calibration_text_with_each_models_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from hetmerge.cli.main import main

    tgt, src = llama(len(CHARS)), gpt2(len(WORDS))
    ft = fine_tune(src, 5)
    tgt.save_pretrained(tmp_path / "t")
    src.save_pretrained(tmp_path / "s")
    ft.save_pretrained(tmp_path / "sft")
    PreTrainedTokenizerFast(tokenizer_object=char_tok()).save_pretrained(tmp_path / "t")
    PreTrainedTokenizerFast(tokenizer_object=word_tok()).save_pretrained(tmp_path / "s")
    s = text(40)
    (tmp_path / "calib.txt").write_text(s)
    argv = ["fuse", str(tmp_path / "t"), f"{tmp_path / 's'}:{tmp_path / 'sft'}", "--calib", str(tmp_path / "calib.txt"),
            "--calib-length", "16", "--rank", "4", "-q", "-o", str(tmp_path / "ad")]
    assert main(argv) == 0
    api = hm.fuse(tgt, [(src, ft)], s, rank=4, tokenizers=[char_tok(), word_tok()], calib_length=16)
    files = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(files) == sorted(api.tensors)
    for k, v in api.tensors.items():
        torch.testing.assert_close(files[k], v, atol=1e-5, rtol=1e-4)
    peft.PeftModel.from_pretrained(copy.deepcopy(tgt), str(tmp_path / "ad"))
    # a source directory without a tokenizer: text calibration cannot read it (exit 4); the text is
    # given inline and longer than a file name may be (it crashed Path.is_file with ENAMETOOLONG)
    src.save_pretrained(tmp_path / "s2")
    argv2 = ["fuse", str(tmp_path / "t"), f"{tmp_path / 's2'}:{tmp_path / 'sft'}", "--calib", s, "--rank", "4", "-q",
             "-o", str(tmp_path / "x")]
    assert main(argv2) == 4 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, msg", [({"tokenizers": None}, "needs a tokenizer"),
                                     ({"tokenizers": [None]}, "list of 2"),
                                     ({"calib_pool": "max"}, "calib_pool must be one of"),
                                     ({"calib_length": 0}, "calib_length must be a positive int"),
                                     ({"calib": ""}, "calib text is empty"),
                                     ({"tokenizers": [object(), object()]}, "tokenizer must be a tokenizers"),
                                     ({"tokenizers": [lambda t: ([1, 2], [2, 1]), char_tok()]}, "go backwards"),
                                     ({"tokenizers": [char_tok(), char_tok()]}, "vocabulary has 14 tokens")])
def test_bad_text_calibration_raises_naming_the_argument(kw, msg):
    tgt, src = llama(len(CHARS)), llama(len(WORDS), seed=2)
    args = {"calib": "the cat sat.", "tokenizers": [char_tok(), word_tok()], **kw}
    with pytest.raises(FusionError, match=msg):
        hm.fuse(tgt, [(src, fine_tune(src, 1))], args.pop("calib"), rank=2, **args)

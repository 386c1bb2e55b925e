"""Rule tables of the Hugging Face families that ``transformer_spec`` reads: which group every
tensor's axes belong to, by key name (one table per model_type; a new family is one entry in
FAMILIES)."""
from __future__ import annotations

import re

RESIDUAL = "residual"

# A rule: (regex over the key, [(group, axis[, block]), ...]). "{L}" in a group name is the regex's
# "L" capture (the block's prefix); an empty list means every axis of that tensor stays fixed; a
# (FUSED, axis, (group, ...)) entry is an axis of equal parts, one per group, in order.
# Attention: "{L}attn.qk" and "{L}attn.vo" are tied by one head map (ties "{L}attn", see spec.Tie).
# With RoPE the qk unit is a key/value head: a block of _HD (head_dim) rows of k and _QH (head_dim ·
# query heads per key/value head) rows of q. o's columns are canonically (head, dim, query head):
# _REP (query heads per key/value head) columns per V dimension (see CanonicalState).
_R, _MLP, _QK, _VO = RESIDUAL, "{L}mlp", "{L}attn.qk", "{L}attn.vo"
_HD, _QH, _REP = "head_dim", "query_group", "query_heads"
FUSED = "fused"
_LLAMA = [
    (r"(.*\.)?embed_tokens\.weight", [(_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)(input_layernorm|post_attention_layernorm)\.weight", [(_R, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.q_proj\.weight", [(_QK, 0, _QH), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.k_proj\.weight", [(_QK, 0, _HD), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.v_proj\.weight", [(_VO, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.q_proj\.bias", [(_QK, 0, _QH)]),     # Qwen2
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.k_proj\.bias", [(_QK, 0, _HD)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.v_proj\.bias", [(_VO, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.o_proj\.weight", [(_R, 0), (_VO, 1, _REP)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)self_attn\.o_proj\.bias", [(_R, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.(gate|up)_proj\.weight", [(_MLP, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.(gate|up)_proj\.bias", [(_MLP, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.down_proj\.weight", [(_R, 0), (_MLP, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.down_proj\.bias", [(_R, 0)]),
    (r"(.*\.)?norm\.weight", [(_R, 0)]),
    (r"(lm_head|score)\.weight", [(_R, 1)]),
    (r"(lm_head|score)\.bias", []),
]
_GPT2 = [   # Conv1D weights are [in, out]
    (r"(.*\.)?w[tp]e\.weight", [(_R, 1)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)ln_[12]\.(weight|bias)", [(_R, 0)]),
    # c_attn's output axis is q | k | v: parts of the qk, qk and vo groups
    (r"(?P<L>(.*\.)?h\.\d+\.)attn\.c_attn\.weight", [(_R, 0), (FUSED, 1, (_QK, _QK, _VO))]),
    (r"(?P<L>(.*\.)?h\.\d+\.)attn\.c_attn\.bias", [(FUSED, 0, (_QK, _QK, _VO))]),
    (r"(?P<L>(.*\.)?h\.\d+\.)attn\.c_proj\.weight", [(_VO, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)attn\.c_proj\.bias", [(_R, 0)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)attn\.(masked_)?bias", []),                      # causal-mask buffers
    (r"(?P<L>(.*\.)?h\.\d+\.)mlp\.c_fc\.weight", [(_R, 0), (_MLP, 1)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)mlp\.c_fc\.bias", [(_MLP, 0)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)mlp\.c_proj\.weight", [(_MLP, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?h\.\d+\.)mlp\.c_proj\.bias", [(_R, 0)]),
    (r"(.*\.)?ln_f\.(weight|bias)", [(_R, 0)]),
    (r"(lm_head|score)\.weight", [(_R, 1)]),
    (r"(lm_head|score)\.bias", []),
]
# BERT and ViT (transformers 4.x names) share the encoder layout (post-LN in BERT, pre-LN in ViT:
# the same groups)
_ENCODER = [
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.(self|attention)\.(query|key)\.weight", [(_QK, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.(self|attention)\.value\.weight", [(_VO, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.(self|attention)\.(query|key)\.bias", [(_QK, 0)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.(self|attention)\.value\.bias", [(_VO, 0)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.output\.dense\.weight", [(_R, 0), (_VO, 1)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)attention\.output\.dense\.bias", [(_R, 0)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)intermediate\.dense\.weight", [(_MLP, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)intermediate\.dense\.bias", [(_MLP, 0)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)output\.dense\.weight", [(_R, 0), (_MLP, 1)]),
    (r"(?P<L>(.*\.)?layer\.\d+\.)output\.dense\.bias", [(_R, 0)]),
    (r"(.*\.)?pooler\.dense\.weight", [(_R, 1)]),
    (r"(.*\.)?pooler\.dense\.bias", []),
]
_BERT = [
    (r"(.*\.)?embeddings\.(word|position|token_type)_embeddings\.weight", [(_R, 1)]),
    (r"(.*\.)?embeddings\.LayerNorm\.(weight|bias)", [(_R, 0)]),
    (r"(.*\.)?embeddings\.position_ids", []),
    (r"(.*\.)?embeddings\.token_type_ids", []),
    (r"(?P<L>(.*\.)?layer\.\d+\.)(attention\.)?output\.LayerNorm\.(weight|bias)", [(_R, 0)]),
    *_ENCODER,
    (r"classifier\.(weight|bias)", []),          # reads the pooler's output (fixed)
]
_VIT = [
    (r"(.*\.)?embeddings\.(cls_token|mask_token|position_embeddings)", [(_R, 1)]),   # 2-D views
    (r"(.*\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", [(_R, 0)]),
    (r"(?P<L>(.*\.)?layers?\.\d+\.)layernorm_(before|after)\.(weight|bias)", [(_R, 0)]),
    (r"(.*\.)?layernorm\.(weight|bias)", [(_R, 0)]),
    *_ENCODER,
    # transformers >= 5 names: layers.i.attention.{q,k,v,o}_proj, layers.i.mlp.fc1/fc2
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.[qk]_proj\.weight", [(_QK, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.v_proj\.weight", [(_VO, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.[qk]_proj\.bias", [(_QK, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.v_proj\.bias", [(_VO, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.o_proj\.weight", [(_R, 0), (_VO, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)attention\.o_proj\.bias", [(_R, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.fc1\.weight", [(_MLP, 0), (_R, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.fc1\.bias", [(_MLP, 0)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.fc2\.weight", [(_R, 0), (_MLP, 1)]),
    (r"(?P<L>(.*\.)?layers\.\d+\.)mlp\.fc2\.bias", [(_R, 0)]),
    (r"classifier\.weight", [(_R, 1)]),          # reads the final norm's CLS token
    (r"classifier\.bias", []),
]
# families whose norms are RMSNorm (gain only, statistic = root mean square over the stream)
_RMS_NORM_FAMILIES = {"llama", "mistral", "qwen2"}
_NORM_GAIN = re.compile(r"(.*\.)?(input_layernorm|post_attention_layernorm|norm)\.weight")
FAMILIES: dict[str, list] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2,
                             "bert": _BERT, "vit": _VIT}
# families with rotary position embeddings: a rotary pair keeps its frequency, so Q/K move only as
# whole heads (and heads of another size cannot be padded: the frequencies depend on the head size)
_ROPE_FAMILIES = {"llama", "mistral", "qwen2"}
# (key, axis, part) of the tensors holding Q, for the softmax-scale fold of padded heads
_QUERIES = [(re.compile(r"(.*\.)?self_attn\.q_proj\.(weight|bias)"), 0, 0),
            (re.compile(r"(.*\.)?attn\.c_attn\.weight"), 1, 0),
            (re.compile(r"(.*\.)?attn\.c_attn\.bias"), 0, 0),
            (re.compile(r"(.*\.)?(attention\.(self|attention)\.query|attention\.q_proj)\.(weight|bias)"), 0, 0)]
# o_proj under GQA: columns stored (head, query head, dim), canonically (head, dim, query head)
_O_PROJ = re.compile(r"(.*\.)?self_attn\.o_proj\.weight")
# tensors whose hidden axis is the last of [1, n, d]: seen as [n, d]
_VIEWS = {"vit": re.compile(r"(.*\.)?embeddings\.(cls_token|mask_token|position_embeddings)")}

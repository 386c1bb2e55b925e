"""Tiny random Hugging Face models built from configs (no download) and inputs for them."""
from __future__ import annotations

import torch


def build(family: str, seed: int = 0, tied: bool = True):
    """(model in eval mode, example inputs as kwargs) for a tiny random model of `family`."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000)
    ids = torch.randint(0, 40, (2, 7), generator=g)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        cfg = cls[0](vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                     tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return cls[1](cfg).eval(), {"input_ids": ids}
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=40, n_embd=24, n_layer=2, n_head=4, n_positions=16,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
        return tf.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=40, max_position_embeddings=16, type_vocab_size=2)
        return tf.BertModel(cfg).eval(), {"input_ids": ids, "token_type_ids": (ids % 2)}
    if family == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=40, num_labels=5)
        x = torch.randn(2, 3, 16, 16, generator=g)
        return tf.ViTForImageClassification(cfg).eval(), {"pixel_values": x}
    raise ValueError(family)


def outputs(model, inputs) -> torch.Tensor:
    """The model's logits (or last hidden state and pooled output for BertModel), one tensor."""
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], 1)

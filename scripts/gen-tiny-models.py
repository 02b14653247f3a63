#!/usr/bin/env python3
"""Writes tests/fixtures/tiny/: one tiny random-weight model per decoder family, made
with `transformers` (Llama with llama3 rope scaling, Mistral with a sliding window,
Qwen2 with qkv bias and tied embeddings, Qwen3 with q/k norms), each as a Hugging Face
folder (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
model.safetensors in f32) and, where llama.cpp has the architecture, as GGUF written
with the `gguf` package the way llama.cpp's converter lays it out. Beside each:
`golden.json` with transformers' logits for a fixed input (every position).

Run by scripts/gen-tiny-models (which makes .venv-fixtures with torch, transformers,
tokenizers and gguf). The output is committed; tests never run Python.
"""
import json
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny")

CORPUS = [
    "The hearth is the heart of the home, where the fire burns through the winter.",
    "Models run on the machines their owners already have, without a network.",
    "Queries and keys meet in attention; values carry what the model remembers.",
    "One two three four five six seven eight nine ten eleven twelve.",
    "Llamas, Mistrals and Qwens are families of open-weight language models.",
    "An auditor reads the log, checks the chain of hashes, and signs the report.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "The hearth of the home: queries, keys and values meet in attention."
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def families(vocab):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=0.2,
    )
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "mistral": MistralConfig(**common, tie_word_embeddings=False, sliding_window=8, head_dim=16),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False),
        "qwen3": Qwen3Config(**common, tie_word_embeddings=True, head_dim=32, use_sliding_window=False),
    }


def rope(cfg):
    """(theta, scaling dict or None): transformers 5 keeps both in `rope_parameters`."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    scaling = params if params.get("rope_type", "default") != "default" else getattr(cfg, "rope_scaling", None)
    return theta, scaling


def legacy_layout(d):
    """Rewrites a folder the way most published checkpoints still look (transformers 4):
    `rope_theta` / `rope_scaling` in config.json, the chat template inside
    tokenizer_config.json."""
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    json.dump(cfg, open(path, "w"), indent=2)
    jinja = os.path.join(d, "chat_template.jinja")
    path = os.path.join(d, "tokenizer_config.json")
    tc = json.load(open(path))
    tc["chat_template"] = open(jinja).read()
    os.remove(jinja)
    json.dump(tc, open(path, "w"), indent=2)


def permute(w, heads):
    """HF's rotate-half q/k rows to the interleaved pairs llama.cpp's llama uses."""
    w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return w.swapaxes(1, 2).reshape(-1, *w.shape[3:])


def llama3_rope_factors(cfg):
    base, s = rope(cfg)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, arch, cfg, state, tok_json, qtype=None):
    """`qtype`: a gguf.GGMLQuantizationType for the 2-D weight matrices (norms, biases
    and rope factors stay f32, as llama.cpp's quantizer leaves them)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope(cfg)[0])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type({None: 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}[qtype.name if qtype else None])
    # Tokenizer as llama.cpp writes a byte-level BPE one.
    vocab = tok_json["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for k, v in per_layer.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().to(torch.float32).numpy()
        if arch == "llama" and (name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
            a = permute(a, heads if "q_proj" in name else kv)
        a = np.ascontiguousarray(a)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(names[name], gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[name], a)
    scaling = rope(cfg)[1] or {}
    if arch == "llama" and scaling.get("rope_type", scaling.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    torch.manual_seed(0)
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    ids = tok.encode(TEXT).ids
    assert len(ids) > 16, ids
    for family, cfg in families(vocab).items():
        d = os.path.join(OUT, family)
        os.makedirs(d, exist_ok=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
        model.eval()
        model.save_pretrained(d, safe_serialization=True)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|im_end|>", pad_token="<|endoftext|>")
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(d)
        for junk in ["special_tokens_map.json"]:
            p = os.path.join(d, junk)
            if os.path.exists(p):
                os.remove(p)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        golden = {
            "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
            "text": TEXT,
            "input_ids": ids,
            "logits": [[float(x) for x in row] for row in logits],
        }
        with open(os.path.join(d, "golden.json"), "w") as f:
            json.dump(golden, f)
        if family in ("mistral", "qwen2"):
            legacy_layout(d)
        if family in ("llama", "qwen2", "qwen3"):
            tok_json = json.loads(tok.to_str())
            write_gguf(os.path.join(d, f"tiny-{family}.gguf"), family, cfg, model.state_dict(), tok_json)
        if family == "llama":
            # The same model in every type gguf-py can write, for the reader's sake.
            from gguf import GGMLQuantizationType as Q
            for q in [Q.F16, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0]:
                write_gguf(os.path.join(d, f"tiny-llama.{q.name.lower()}.gguf"), family, cfg,
                           model.state_dict(), json.loads(tok.to_str()), qtype=q)
        print(f"{family}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"{len(ids)} input tokens -> {d}", file=sys.stderr)
    k_quant_base(tok, ids)


def k_quant_base(tok, ids):
    """A tiny Llama whose rows are 256 wide, the K-quants' block: its golden logits, and
    its f32 GGUF in /tmp for scripts/quantize-tiny.py (llama.cpp's quantizer) to turn
    into Q2_K … Q6_K files. Only the golden and the quantized files are committed."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=2, initializer_range=0.05,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    d = os.path.join(OUT, "llama-k")
    os.makedirs(d, exist_ok=True)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
                   "text": TEXT, "input_ids": ids,
                   "logits": [[float(x) for x in row] for row in logits]}, f)
    write_gguf("/tmp/hearth-tiny-llama-k.f32.gguf", "llama", cfg, model.state_dict(),
               json.loads(tok.to_str()))


if __name__ == "__main__":
    main()

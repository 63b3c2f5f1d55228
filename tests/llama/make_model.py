#!/usr/bin/env python3
"""Writes the small random-weight GGUF model the llama.cpp tests, demo and bench run on.

llama architecture (4 layers, width 512, FFN 1536, 8 attention heads, 4 KV heads), F16 weights
drawn from a seeded normal distribution, so the file is the same on every machine. Its text is
gibberish, but what the tests measure is real: the tokenizer is a real one (copied from one of
the vocab-only GGUFs that ship in llama.cpp's source, `models/ggml-vocab-*.gguf`), prefill costs
what a model of this shape costs, and llama-server's prompt cache works on it as on any model.
The chat template is given separately (one of `models/templates/*.jinja`).

Needs the `gguf` and `numpy` packages (`pip install gguf numpy`).

    make_model.py --vocab VOCAB.gguf --template TEMPLATE.jinja --out MODEL.gguf
"""

import argparse
import os
import sys

try:
    import gguf
    import numpy as np
except ImportError as e:  # pragma: no cover - the message is the point
    sys.exit(f"make_model.py needs the gguf and numpy packages ({e}): pip install gguf numpy")

# The model's shape; `cargo xtask llama` keys its cached model on this file's bytes, so
# changing any of these makes a new model.
LAYERS = 4
WIDTH = 512
FFN = 1536
HEADS = 8
KV_HEADS = 4
CONTEXT = 4096
ROPE_BASE = 10000.0
RMS_EPS = 1e-5
INIT_STD = 0.02
SEED = 18


def copy_tokenizer(writer, vocab_path):
    """Copies every `tokenizer.*` key of the vocab-only GGUF; returns the vocabulary size."""
    reader = gguf.GGUFReader(vocab_path)
    n_vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab is None:
        sys.exit(f"{vocab_path}: no tokenizer.ggml.tokens, not a vocab GGUF")
    return n_vocab


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", required=True, help="a vocab-only GGUF from llama.cpp's models/")
    p.add_argument("--template", required=True, help="a Jinja chat template file")
    p.add_argument("--out", required=True, help="where to write the model")
    a = p.parse_args()

    with open(a.template, encoding="utf-8") as f:
        template = f.read()
    tmp = a.out + ".partial"
    arch = "llama"
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name("kvroute-test-random")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_rope_freq_base(ROPE_BASE)
    n_vocab = copy_tokenizer(w, a.vocab)
    w.add_vocab_size(n_vocab)
    w.add_chat_template(template)

    rng = np.random.default_rng(SEED)
    head_dim = WIDTH // HEADS

    def matrix(rows, cols):
        # numpy (rows, cols) is GGUF's [cols, rows]: `rows` outputs from `cols` inputs.
        return (rng.standard_normal((rows, cols), dtype=np.float32) * INIT_STD).astype(np.float16)

    def norm():
        return np.ones(WIDTH, dtype=np.float32)

    w.add_tensor("token_embd.weight", matrix(n_vocab, WIDTH))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm())
        w.add_tensor(b + "attn_q.weight", matrix(HEADS * head_dim, WIDTH))
        w.add_tensor(b + "attn_k.weight", matrix(KV_HEADS * head_dim, WIDTH))
        w.add_tensor(b + "attn_v.weight", matrix(KV_HEADS * head_dim, WIDTH))
        w.add_tensor(b + "attn_output.weight", matrix(WIDTH, HEADS * head_dim))
        w.add_tensor(b + "ffn_norm.weight", norm())
        w.add_tensor(b + "ffn_gate.weight", matrix(FFN, WIDTH))
        w.add_tensor(b + "ffn_up.weight", matrix(FFN, WIDTH))
        w.add_tensor(b + "ffn_down.weight", matrix(WIDTH, FFN))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", matrix(n_vocab, WIDTH))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Written aside and renamed: an interrupted run never leaves a truncated model behind
    # that a later run would take for the cached one.
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()

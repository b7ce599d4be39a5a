"""Import the released ELMER weights (or any Hugging Face BART checkpoint) as an ``elmer_nat`` checkpoint.

    elmer-convert-hf HF_DIR OUT_DIR --dict bart.base/dict.txt
    elmer-convert-hf HF_DIR OUT_DIR --encoder-json gpt2/encoder.json

HF_DIR is a ``save_pretrained`` / hub folder (config.json with model.safetensors
or pytorch_model.bin; e.g. a local copy of RUCAIBox/elmer) or a weights file
with ``--config``. The released ELMER checkpoint is BART-base in Hugging Face's
BartForConditionalGeneration layout: GPT-2 byte BPE, 50265 embeddings with
``<mask>`` = 50264, and one ``lm_head`` tied to the embeddings (plus a zero
``final_logits_bias``) that serves as the off-ramp of every decoder layer.

Hugging Face's token ids follow fairseq's BART dictionary order, so the
fairseq dictionary is BART's ``dict.txt`` (``--dict``), or is rebuilt from the
folder's vocab.json and GPT-2's encoder.json (``--encoder-json``): symbol i is
the GPT-2 id of HF token i. Tensor names map one to one (``model.`` prefix
dropped); the decoder's self-attention becomes bidirectional by construction
of elmer_nat. No ``transformers`` import: weights are read with safetensors or
``torch.load(weights_only=True)``.
"""

import json
import logging
import os

import torch

from fairseq.data import Dictionary

from .canvas import MASK_SYMBOL
from .checkpoint_convert import converter_main, convert_weights

logger = logging.getLogger(__name__)
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_accurate", "gelu_fast": "gelu_fast", "tanh": "tanh"}


def read_weights(path):
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)")
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def locate(src, config):
    """(weights file, config.json) of a checkpoint folder or file."""
    if os.path.isdir(src):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(src, name)):
                return os.path.join(src, name), config or os.path.join(src, "config.json")
        raise FileNotFoundError(f"{src}: no model.safetensors or pytorch_model.bin")
    if not config:
        raise ValueError(f"{src} is a file: give its config.json with --config")
    return src, config


def model_flags(config):
    for key in ("normalize_before", "add_final_layer_norm"):
        if config.get(key):
            raise ValueError(f"config.json: {key}=true is mBART's layout, not BART's; elmer_nat is post-norm")
    for key, want in (("bos_token_id", 0), ("pad_token_id", 1), ("eos_token_id", 2)):
        if config.get(key, want) != want:
            raise ValueError(f"config.json: {key}={config[key]}, fairseq's dictionary needs {want}")
    activation = config.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"config.json: activation_function {activation!r} has no fairseq counterpart")
    d = str(config["d_model"])
    flags = [
        "--encoder-embed-dim", d, "--decoder-embed-dim", d,
        "--encoder-layers", str(config["encoder_layers"]), "--decoder-layers", str(config["decoder_layers"]),
        "--encoder-ffn-embed-dim", str(config["encoder_ffn_dim"]),
        "--decoder-ffn-embed-dim", str(config["decoder_ffn_dim"]),
        "--encoder-attention-heads", str(config["encoder_attention_heads"]),
        "--decoder-attention-heads", str(config["decoder_attention_heads"]),
        "--max-source-positions", str(config["max_position_embeddings"]),
        "--max-target-positions", str(config["max_position_embeddings"]),
        "--activation-fn", ACTIVATIONS[activation],
    ]
    if config.get("scale_embedding"):
        flags.append("--scale-embedding")
    return flags


def to_fairseq(hf):
    """Hugging Face BART tensor names -> elmer_nat/fairseq names (embeddings handled by the caller)."""
    out = {}
    for key, tensor in hf.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name in EMBEDDING_KEYS or name == "final_logits_bias":
            continue
        if name.startswith(("encoder.layer_norm", "decoder.layer_norm")):
            raise ValueError(f"{key}: a final layer norm (mBART) has no place in elmer_nat")
        out[name] = tensor
    embeddings = [hf[k] for k in EMBEDDING_KEYS + tuple("model." + k for k in EMBEDDING_KEYS) if k in hf]
    if not embeddings:
        raise ValueError("no embedding matrix (model.shared.weight / lm_head.weight) in the checkpoint")
    if any(not torch.equal(e, embeddings[0]) for e in embeddings[1:]):
        raise ValueError("encoder/decoder embeddings and lm_head differ: elmer_nat ties them all (one off-ramp)")
    bias = hf.get("final_logits_bias")
    if bias is not None and bias.abs().max() > 0:
        raise ValueError("final_logits_bias is not zero: elmer_nat's off-ramps have no bias")
    out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"] = embeddings[0]
    return out


def fairseq_dictionary(src_dir, num_embeddings, dict_path=None, encoder_json=None):
    if dict_path:
        return Dictionary.load(dict_path)
    vocab_path = os.path.join(src_dir, "vocab.json") if os.path.isdir(src_dir) else None
    if not encoder_json or not vocab_path or not os.path.isfile(vocab_path):
        raise ValueError(
            "the fairseq dictionary: give --dict (BART's dict.txt) or --encoder-json (GPT-2's encoder.json, "
            "with vocab.json in the checkpoint folder)"
        )
    with open(vocab_path, encoding="utf-8") as f:
        hf_vocab = json.load(f)
    with open(encoder_json, encoding="utf-8") as f:
        gpt2 = json.load(f)
    by_id = {i: tok for tok, i in hf_vocab.items()}
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    if [by_id.get(i) for i in range(4)] != specials or by_id.get(num_embeddings - 1) != MASK_SYMBOL:
        raise ValueError(f"{vocab_path}: expected {specials} at ids 0-3 and <mask> last, as in BART")
    d = Dictionary()
    for i in range(4, num_embeddings - 1):
        if by_id.get(i) not in gpt2:
            raise ValueError(f"{vocab_path}: id {i} ({by_id.get(i)!r}) is not a GPT-2 token of {encoder_json}")
        d.add_symbol(str(gpt2[by_id[i]]))
    return d


def convert(src, out_dir, dict_path=None, encoder_json=None, config_path=None, extra_flags=()):
    weights_path, config_path = locate(src, config_path)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    weights = to_fairseq(read_weights(weights_path))
    rows = weights["encoder.embed_tokens.weight"].size(0)
    dictionary = fairseq_dictionary(src, rows, dict_path, encoder_json)
    return convert_weights(out_dir, dictionary, weights, model_flags(config) + list(extra_flags))


def main():
    converter_main(__doc__, [
        ("src", {"help": "Hugging Face checkpoint folder, or a weights file with --config"}),
        ("out_dir", {}),
        ("--dict", {"help": "BART's fairseq dict.txt"}),
        ("--encoder-json", {"help": "GPT-2's encoder.json (rebuilds dict.txt from vocab.json)"}),
        ("--config", {"help": "config.json when SRC is a weights file"}),
    ], lambda args, flags: convert(args.src, args.out_dir, args.dict, args.encoder_json, args.config, flags))


if __name__ == "__main__":
    main()

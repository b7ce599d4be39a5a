"""Start ELMER from BART: turn a fairseq BART checkpoint into an ``elmer_nat`` checkpoint.

    elmer-init-from-bart bart.base/model.pt OUT_DIR [--dict bart.base/dict.txt]

Every BART tensor keeps its name and place: encoder, decoder layers, shared
embeddings, learned positions, embedding layer norms. What changes is how the
decoder is used: its self-attention becomes bidirectional (ELMER masks
nothing), and BART's output projection (tied to the embeddings) becomes the
one off-ramp shared by all decoder layers (§5.1). New parameters start from
elmer_nat's own initialisation: the soft-exit mixer W = [small | identity]
(only in a ``--early-exit soft`` model, where it is created at fine-tuning).
Sizes (layers, dimensions, heads, positions, embedding scale) are read from
the checkpoint. Writes OUT_DIR/model.pt and the dictionary (see
checkpoint_convert.py). Loading stays ``weights_only=True``.
"""

import argparse
import logging
import os

from fairseq import checkpoint_utils
from fairseq.data import Dictionary

from .checkpoint_convert import converter_main, convert_weights

logger = logging.getLogger(__name__)

# BART option -> elmer_nat flag (values copied)
SIZE_FLAGS = {
    "encoder_layers": "--encoder-layers",
    "decoder_layers": "--decoder-layers",
    "encoder_embed_dim": "--encoder-embed-dim",
    "decoder_embed_dim": "--decoder-embed-dim",
    "encoder_ffn_embed_dim": "--encoder-ffn-embed-dim",
    "decoder_ffn_embed_dim": "--decoder-ffn-embed-dim",
    "encoder_attention_heads": "--encoder-attention-heads",
    "decoder_attention_heads": "--decoder-attention-heads",
    "max_source_positions": "--max-source-positions",
    "max_target_positions": "--max-target-positions",
    "activation_fn": "--activation-fn",
}
# BART tensors with no counterpart, each for a stated reason
DROPPED = {
    "decoder.output_projection.weight": "tied to the embeddings: it is the off-ramp",
}


def bart_options(state):
    """BART's model options from either checkpoint style (argparse ``args`` or ``cfg.model``)."""
    model = state["cfg"].get("model") if state.get("cfg") is not None else state.get("args")
    if isinstance(model, argparse.Namespace):  # legacy checkpoints keep argparse options
        return vars(model)
    if model is not None:
        return dict(model)
    raise ValueError("the checkpoint has neither 'cfg' nor 'args': not a fairseq checkpoint")


def model_flags(opts):
    flags = []
    for key, flag in SIZE_FLAGS.items():
        if opts.get(key) is not None:
            flags += [flag, str(opts[key])]
    checks = {
        "share_all_embeddings": (True, "elmer_nat shares all embeddings"),
        "encoder_normalize_before": (False, "elmer_nat's encoder is post-norm like BART"),
        "encoder_learned_pos": (True, "learned encoder positions"),
        "decoder_learned_pos": (True, "learned decoder positions"),
    }
    for key, (want, why) in checks.items():
        if key in opts and bool(opts[key]) != want:
            raise ValueError(f"BART option {key}={opts[key]} is not supported ({why})")
    if opts.get("decoder_normalize_before"):
        flags.append("--decoder-normalize-before")
    if not opts.get("no_scale_embedding", True):
        flags.append("--scale-embedding")
    if opts.get("layernorm_embedding") is False:
        flags.append("--no-layernorm-embedding")
    return flags


def convert(model_pt, out_dir, dict_path=None, extra_flags=()):
    state = checkpoint_utils.load_checkpoint_to_cpu(model_pt)
    weights = dict(state["model"])
    dict_path = dict_path or os.path.join(os.path.dirname(os.path.abspath(model_pt)), "dict.txt")
    if not os.path.isfile(dict_path):
        raise FileNotFoundError(f"--dict: no {dict_path} (BART's dict.txt ships beside model.pt)")
    heads = [k for k in weights if k.startswith("classification_heads.")]
    if heads:
        raise ValueError(f"the checkpoint has classification heads ({heads[:3]}...): use a plain BART checkpoint")
    for key, why in DROPPED.items():
        if weights.pop(key, None) is not None:
            logger.info(f"not copied: {key} ({why})")
    flags = model_flags(bart_options(state)) + list(extra_flags)
    return convert_weights(out_dir, Dictionary.load(dict_path), weights, flags)


def main():
    converter_main(__doc__, [
        ("bart_checkpoint", {"help": "a fairseq BART model.pt (e.g. bart.base/model.pt)"}),
        ("out_dir", {}),
        ("--dict", {"help": "BART's dict.txt (default: beside the checkpoint)"}),
    ], lambda args, flags: convert(args.bart_checkpoint, args.out_dir, args.dict, flags))


if __name__ == "__main__":
    main()

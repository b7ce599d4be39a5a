"""Writing ``elmer_nat`` checkpoints from other models' weights.

Used by ``elmer-init-from-bart`` (``convert_bart.py``, a fairseq BART checkpoint)
and ``elmer-convert-hf`` (``convert_hf.py``, a Hugging Face BART / released-ELMER
checkpoint). A converted folder is a complete fairseq model folder:

    OUT/model.pt                         the elmer_nat checkpoint (fairseq format)
    OUT/dict.txt, dict.src.txt, dict.tgt.txt   its dictionary (``<mask>`` is re-added last)

so ``fairseq-train --finetune-from-model OUT/model.pt`` (with data binarized
against ``OUT/dict.txt``), ``fairseq-generate --path OUT/model.pt`` and
``ELMER.from_pretrained(OUT, checkpoint_file="model.pt")`` all take it.
The model is built by fairseq from the current option names, every tensor
is loaded with ``strict=True``, and nothing is dropped without a check.
"""

import argparse
import logging
import os
import pickle
from typing import Dict, List

import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

from .canvas import MASK_SYMBOL

logger = logging.getLogger(__name__)


def write_dictionary(dictionary: Dictionary, out_dir: str, num_embeddings: int) -> None:
    """Write the dictionary (without ``<mask>``, which the task appends) and check that with
    ``<mask>`` it has exactly ``num_embeddings`` symbols, ``<mask>`` last."""
    size = len(dictionary) + (0 if MASK_SYMBOL in dictionary else 1)
    if size != num_embeddings:
        raise ValueError(
            f"the dictionary has {size} symbols with {MASK_SYMBOL} but the checkpoint's embeddings have "
            f"{num_embeddings} rows: give the dictionary the checkpoint was trained with"
        )
    if MASK_SYMBOL in dictionary and dictionary.index(MASK_SYMBOL) != len(dictionary) - 1:
        raise ValueError(f"{MASK_SYMBOL} must be the dictionary's last symbol, it is {dictionary.index(MASK_SYMBOL)}")
    os.makedirs(out_dir, exist_ok=True)
    plain = Dictionary()
    for i in range(dictionary.nspecial, len(dictionary)):
        if dictionary[i] != MASK_SYMBOL:
            plain.add_symbol(dictionary[i], n=dictionary.count[i])
    for name in ("dict.txt", "dict.src.txt", "dict.tgt.txt"):
        plain.save(os.path.join(out_dir, name))


def build_elmer(out_dir: str, model_args: List[str]):
    """An ``elmer_nat`` model (and its fairseq config) for the dictionary in ``out_dir``,
    configured by fairseq's own parser from ``model_args`` (e.g. ``["--encoder-layers", "6"]``)."""
    parser = options.get_training_parser()
    argv = [out_dir, "--task", "nat_early_exit", "-s", "src", "-t", "tgt", "--arch", "elmer_nat",
            "--criterion", "lplm", *model_args]
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return cfg, model


def load_converted(model, state: Dict[str, torch.Tensor]) -> None:
    """Load converted weights with ``strict=True``; a missing or extra tensor is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"conversion mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: converted shape {tuple(v.shape)}, elmer_nat expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)


def save_elmer(cfg, model, path: str) -> None:
    """Save in fairseq's checkpoint format (no optimizer state, no training progress)."""
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {"criterion_name": "LPLMCriterion", "optimizer_name": "none",
             "lr_scheduler_state": {"best": None}, "num_updates": 0}
        ],
        # a fresh start: epoch 1, nothing consumed (fairseq's loader requires the entry)
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "version": 2, "shuffle": True}},
    }
    checkpoint_utils.torch_persistent_save(state, path)
    logger.info(f"wrote {path}")


def convert_weights(out_dir: str, dictionary: Dictionary, weights: Dict[str, torch.Tensor], model_args: List[str]) -> str:
    """The common end of both converters: write the dictionary, build elmer_nat from ``model_args``,
    make every off-ramp the tied embedding matrix (BART's output projection / lm_head), take
    fairseq's format-version buffers from the new model, load strictly and save OUT/model.pt."""
    weights = dict(weights)
    write_dictionary(dictionary, out_dir, weights["encoder.embed_tokens.weight"].size(0))
    cfg, model = build_elmer(out_dir, model_args)
    own = model.state_dict()
    for k in [k for k in weights if k.endswith(".version") and k not in own]:
        logger.info(f"not copied: {k} (fairseq's format version; elmer_nat's decoder has none)")
        weights.pop(k)
    for k in own:
        if k.startswith("decoder.off_ramps."):
            weights[k] = weights["decoder.embed_tokens.weight"]
        elif k.endswith(".version") and k not in weights:
            weights[k] = own[k]
    load_converted(model, weights)
    path = os.path.join(out_dir, "model.pt")
    save_elmer(cfg, model, path)
    return path


def converter_main(doc: str, arguments, convert) -> None:
    """The command line of a converter (``elmer-init-from-bart``, ``elmer-convert-hf``): ``arguments``
    is [(name, argparse keywords)]; options the parser does not know are elmer_nat model flags for the
    new checkpoint; ``convert(args, model_flags)`` returns the path written, which is printed. A bad
    input file ends the command with one line naming it."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    for name, kwargs in arguments:
        parser.add_argument(name, **kwargs)
    args, model_flags = parser.parse_known_args()
    try:
        print(convert(args, model_flags))
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")

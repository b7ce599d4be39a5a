"""Pickle-free model files: ``elmer-export CKPT OUT_DIR`` and ``elmer-import OUT_DIR CKPT``.

``elmer-export`` writes, from a fairseq checkpoint of an ``elmer_nat`` model:

- ``model.safetensors``: every weight once (tied matrices, e.g. the shared embeddings and the last
  off-ramp, are stored under one name; the others are listed as aliases in the file's metadata);
- ``config.json``: the checkpoint's whole fairseq configuration (every model, task, BPE and generation
  option), the alias map and the export format version;
- the task's dictionaries (``dict.<lang>.txt``) and the BPE files the configuration names (e.g. the
  sentencepiece model), referred to relative to OUT_DIR.

Nothing in OUT_DIR is executable: ``load_exported(OUT_DIR)`` (and ``ELMER.from_pretrained(OUT_DIR)``) read
JSON, text and safetensors only, check every tensor's name and shape against the model the configuration
builds, and refuse a damaged or tampered directory naming what is wrong. ``elmer-import`` turns OUT_DIR
back into a fairseq checkpoint for ``fairseq-generate --path``; generation is bit-identical to the
original checkpoint's.
"""

import argparse
import json
import logging
import os
import shutil

import torch
from fairseq import checkpoint_utils, tasks
from fairseq.data import data_utils
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

FORMAT = "elmer-fairseq export 1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# configuration entries that name files: copied into OUT_DIR and re-pointed there on load
FILE_OPTIONS = [("bpe", "sentencepiece_model"), ("bpe", "gpt2_encoder_json"), ("bpe", "gpt2_vocab_bpe"),
                ("bpe", "bpe_codes"), ("bpe", "bpe_vocab")]


def _storage_key(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def split_tied(state_dict):
    """(tensors stored once, {alias: stored name}) for a state dict whose tied weights share storage."""
    stored, aliases, seen = {}, {}, {}
    for name in sorted(state_dict):
        t = state_dict[name]
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            stored[name] = t.contiguous()
    return stored, aliases


def export_model(checkpoint, out_dir, data_dir=None):
    """Write OUT_DIR from a fairseq checkpoint; ``data_dir`` overrides where the dictionaries are read."""
    from safetensors.torch import save_file

    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    cfg = state["cfg"]
    if cfg is None:
        raise ValueError(f"{checkpoint}: a checkpoint without a fairseq configuration ('cfg') cannot be exported")
    if not str(cfg.model._name).startswith("elmer_nat"):
        raise ValueError(f"{checkpoint}: model {cfg.model._name!r} is not an elmer_nat model")
    config = OmegaConf.to_container(cfg, resolve=False)
    os.makedirs(out_dir, exist_ok=True)
    data = (data_dir or cfg.task.data).split(os.pathsep)[0]
    langs = (cfg.task.source_lang, cfg.task.target_lang)
    if None in langs:  # fairseq found the pair from the file names at training time: do the same
        langs = data_utils.infer_language_pair(data)
        if None in langs:
            raise FileNotFoundError(f"{data}: no train.SRC-TGT.SRC.bin files to tell the language pair (pass --data DIR)")
        config["task"]["source_lang"], config["task"]["target_lang"] = langs
    for lang in langs:
        src = os.path.join(data, f"dict.{lang}.txt")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src}: the dictionary of the checkpoint's task is missing (pass --data DIR)")
        shutil.copyfile(src, os.path.join(out_dir, f"dict.{lang}.txt"))
    config["task"]["data"] = "."
    files = {}
    for section, key in FILE_OPTIONS:
        path = (config.get(section) or {}).get(key)
        if path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: --{key.replace('_', '-')} of the checkpoint is missing")
            shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
            config[section][key] = os.path.basename(path)
            files[f"{section}.{key}"] = os.path.basename(path)
    stored, aliases = split_tied(state["model"])
    save_file(stored, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    history = state.get("optimizer_history") or [{}]
    meta = {"format": FORMAT, "cfg": config, "aliases": aliases, "files": files,
            "num_updates": int(history[-1].get("num_updates", 0))}
    with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    logger.info(f"exported {checkpoint} to {out_dir}: {len(stored)} tensors, {len(aliases)} tied aliases")
    return out_dir


def read_config(out_dir):
    path = os.path.join(out_dir, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {CONFIG}; is {out_dir} an elmer-export directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = OmegaConf.create(meta["cfg"], flags={"allow_objects": True})
    cfg.task.data = os.path.abspath(out_dir)
    for option, name in meta.get("files", {}).items():
        section, key = option.split(".")
        cfg[section][key] = os.path.join(os.path.abspath(out_dir), name)
    return cfg, meta


def read_weights(out_dir, expected, aliases):
    """The state dict in OUT_DIR/model.safetensors, with aliases filled in, checked against ``expected``
    ({name: tensor} of the freshly built model): every name present, none extra, every shape the same."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(out_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {WEIGHTS} in {out_dir}")
    try:
        stored = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e})") from None
    unknown = sorted(set(aliases.values()) - set(stored))
    if unknown:
        raise ValueError(f"{path}: the aliases in {CONFIG} point at tensors the file lacks: {unknown[:5]}")
    weights = dict(stored)
    for alias, name in aliases.items():
        weights[alias] = stored[name]
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {extra[:5]}, not in the model {CONFIG} describes")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(expected[name].shape)}")
        if t.dtype != expected[name].dtype:
            raise ValueError(f"{path}: tensor {name} has dtype {t.dtype}, the model expects {expected[name].dtype}")
    return weights


def load_exported(out_dir):
    """(cfg, task, model) from an elmer-export directory, with no pickle involved."""
    cfg, meta = read_config(out_dir)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    weights = read_weights(out_dir, model.state_dict(), meta.get("aliases", {}))
    model.load_state_dict(weights, strict=True)
    return cfg, task, model


def import_model(out_dir, checkpoint):
    """Write a fairseq checkpoint (for fairseq-generate --path) from an elmer-export directory."""
    cfg, _, model = load_exported(out_dir)
    _, meta = read_config(out_dir)
    # fairseq's loader reads the last optimizer_history entry (criterion, optimizer, updates); there is
    # no optimizer state in an export, so training cannot resume from it, only start (--restore-file
    # with --reset-optimizer) or generate
    history = [{"criterion_name": str(cfg.criterion._name) if cfg.criterion else None,
                "optimizer_name": None, "lr_scheduler_state": {}, "num_updates": meta.get("num_updates", 0)}]
    state = {"cfg": OmegaConf.to_container(cfg, resolve=False), "args": None, "model": model.state_dict(),
             "optimizer_history": history, "extra_state": {}, "last_optimizer_state": None}
    os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
    torch.save(state, checkpoint)
    return checkpoint


def export_main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-export", description="Write a fairseq elmer_nat checkpoint as "
                                "model.safetensors + config.json + dictionaries (+ BPE files): no pickle.")
    p.add_argument("checkpoint", help="a fairseq checkpoint (checkpoint_best.pt)")
    p.add_argument("out_dir", help="the directory to write")
    p.add_argument("--data", help="where the checkpoint's dictionaries are (default: the task's data directory "
                   "recorded in the checkpoint)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_model(args.checkpoint, args.out_dir, args.data)
    except (ValueError, FileNotFoundError) as e:
        p.exit(1, f"elmer-export: error: {e}\n")
    print(f"elmer-export: wrote {args.out_dir}/{{{WEIGHTS},{CONFIG}}}")


def import_main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-import", description="Turn an elmer-export directory back into a "
                                "fairseq checkpoint for fairseq-generate --path (weights checked on the way).")
    p.add_argument("out_dir", help="an elmer-export directory")
    p.add_argument("checkpoint", help="the fairseq checkpoint to write")
    args = p.parse_args(argv)
    try:
        import_model(args.out_dir, args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        p.exit(1, f"elmer-import: error: {e}\n")
    print(f"elmer-import: wrote {args.checkpoint}")

#!/usr/bin/env python3
"""Latency, throughput and peak memory of ELMER against the AR and NAR peers a fairseq user would pick.

    python scripts/benchmark.py --data data-bin/sample --elmer checkpoints/demo/checkpoint_best.pt \
        --ar checkpoints/peers/ar/checkpoint_best.pt --nat checkpoints/peers/nat/checkpoint_best.pt
    python scripts/benchmark.py --data data-bin/sample --train-peers checkpoints/peers ...   # train them first
    python scripts/benchmark.py --data data-bin/sample --size base --lengths 16 64            # untrained models

Systems, all on the same test inputs: ELMER (elmer_nat) at the last layer, with hard exit at each
--thresholds δ, and soft exit (--elmer-soft); fairseq's autoregressive ``transformer`` with greedy and
beam-4 incremental decoding (SequenceGenerator); fairseq's ``nonautoregressive_transformer`` (one pass,
length prediction; IterativeRefinementGenerator with max_iter 0); and the floor: one bare encoder +
decoder forward pass of the same ELMER model (+ last off-ramp and argmax), no generator around it;
with --compile also ELMER's generator with torch.compile (warm-up compiles it).

Sentences: --max-sentences of the split spread evenly over its source lengths (``timing_ids``; the same
for every system), not the shortest ones fairseq's iterator yields first.
Timing: ms per sample at batch size 1 (median and p90 over the sentences, after --warmup batches, each
timed call after an untimed one of the same system on the same sentence, with CUDA synchronisation) and
sentences/s at --large-batch. Peak memory per batch size (--memory-batches): CUDA's peak allocation,
or on CPU the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS
before the run. ``--lengths`` forces every system to write outputs
of exactly that many tokens (AR: min_len = max_len; NAT: its length prediction is replaced; ELMER: the
canvas), so the speedup can be read against output length; without it each system decides its own
length. Prints a table laid out like the paper's Table 1 latency column; --json writes every figure.
"""

import argparse
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import elmer_fairseq  # noqa: F401
from elmer_fairseq.early_exit_generator import EarlyExitGenerator
from elmer_fairseq.exit_policies import SoftExit
from elmer_fairseq.generation_io import ExitHistogram
from elmer_fairseq.model_sizes import size_flags

logger = logging.getLogger("benchmark")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"tiny": size_flags(3, 128, 512, 4), "small": size_flags(3, 256, 1024, 4),  # small: the debsum size
         "base": size_flags(6, 768, 3072, 12)}
PEER_TRAINING = {
    "ar": ["--task", "translation", "--arch", "transformer", "--share-all-embeddings",
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "nat": ["--task", "translation_lev", "--arch", "nonautoregressive_transformer", "--share-all-embeddings",
            "--criterion", "nat_loss", "--noise", "full_mask", "--pred-length-offset",
            "--length-loss-factor", "0.1", "--label-smoothing", "0.1"],
}


# ---------------------------------------------------------------- models and generators

def train_peer(kind, data, save_dir, size, updates):
    """Train the AR or NAT peer with fairseq-train on the same data at the same size."""
    ckpt = os.path.join(save_dir, kind, "checkpoint_best.pt")
    if os.path.exists(ckpt):
        return ckpt
    cmd = [sys.executable, "-m", "fairseq_cli.train", data, *PEER_TRAINING[kind], *SIZES[size],
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "200", "--clip-norm", "1.0", "--max-tokens", "4096", "--max-update", str(updates),
           "--save-dir", os.path.join(save_dir, kind), "--no-epoch-checkpoints", "--seed", "1",
           "--num-workers", "0", "--log-format", "simple", "--log-interval", "100"]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    logger.info(f"training the {kind} peer: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, cwd=REPO)
    return ckpt


def untrained(kind, data, size):
    """A randomly initialised model of the given size (latency does not depend on the weights)."""
    task_args = {"elmer": ["--task", "nat_early_exit", "--arch", "elmer_nat", "--criterion", "lplm"],
                 "ar": PEER_TRAINING["ar"], "nat": PEER_TRAINING["nat"]}[kind]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, *task_args, *SIZES[size]])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    return task.build_model(cfg.model), task


def load(path, data):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    return models[0], task


def generation_config(beam, length=None):
    gen = GenerationConfig()
    gen.beam = beam
    if length is not None:  # exactly `length` tokens before </s>
        gen.min_len, gen.max_len_a, gen.max_len_b = length, 0, length
    return gen


class ForcedLength:
    """Replace a NAT model's length prediction by a fixed output length (benchmark only)."""

    def __init__(self, length):
        self.length = length

    def __call__(self, length_out, encoder_out, tgt_tokens=None):
        enc = encoder_out["encoder_out"][0]
        # the NAT canvas holds <s> y </s>: length + 2 slots
        return torch.full((enc.size(1),), self.length + 2, dtype=torch.long, device=enc.device)


class Floor:
    """One bare forward pass of an ELMER model: encoder, every decoder layer, last off-ramp, argmax.
    With ``soft``, the soft-exit model's own pass: the argmax embedding is mixed in after every layer
    but the last (SoftExit), as that model cannot be read without it."""

    def __init__(self, soft=False):
        self.soft = soft

    def generate(self, models, sample, **unused):
        model = models[0]
        net = sample["net_input"]
        policy = SoftExit() if self.soft else None
        states, _ = model(net["src_tokens"], net["src_lengths"], sample["canvas"], policy=policy)
        return model.decoder.off_ramp(states, model.num_exit_layers).max(-1).indices  # (bf16: argmax is slow)


class DecoderSetting:
    """A generator run with decoder attributes set for the call: ``skip_exited=False``, the masked layer
    loop (every token through every layer) to time against hard exit that skips exited tokens' work;
    ``screen_argmax=False``, soft exit's inner argmax from the full fp32 projection to time against the
    screened one (the defaults at inference)."""

    def __init__(self, gen, **settings):
        self.gen = gen
        self.settings = settings

    def generate(self, models, sample, **kwargs):
        decoder = models[0].decoder
        saved = {key: getattr(decoder, key) for key in self.settings}
        for key, value in self.settings.items():
            setattr(decoder, key, value)
        try:
            return self.gen.generate(models, sample, **kwargs)
        finally:
            for key, value in saved.items():
                setattr(decoder, key, value)


def systems(args, device, dtype):
    """(name, model, task, generator, sample hook) for every system benchmarked."""
    out = []
    length = args.length

    def place(model):
        return model.to(device=device, dtype=dtype).eval()

    def elmer(path):
        model, task = load(path, args.data) if path else untrained("elmer", args.data, args.size)
        model = place(model)
        if length is not None:  # the canvas holds exactly length + 1 slots (y + </s>)
            model.cfg.canvas_len_a, model.cfg.canvas_len_b = 0.0, length + 1
        return model, task

    if args.elmer or args.size:
        model, task = elmer(args.elmer)
        tgt = task.target_dictionary
        if model.cfg.early_exit == "soft":
            # a soft-exit checkpoint read with hard exit: its off-ramps are trained at every layer, so its
            # tokens exit where a trained model's would; for timing only (the soft transform is not applied)
            logger.warning(f"--elmer {args.elmer}: a soft-exit model, timed with last-layer and hard exit "
                           "(its scores would not be the soft model's)")
            model.cfg.early_exit = "lplm"
        out.append(("ELMER floor (bare forward)", model, task, Floor(), True))
        out.append(("ELMER last layer", model, task, EarlyExitGenerator(tgt, exit_threshold=0.0), False))
        if args.compile:
            gen = EarlyExitGenerator(tgt, exit_threshold=0.0, compile=True)
            out.append(("ELMER last layer --compile", model, task, gen, False))
        for delta in args.thresholds:
            out.append((f"ELMER hard δ={delta:g}", model, task, EarlyExitGenerator(tgt, exit_threshold=delta), False))
            if args.masked_too:
                gen = DecoderSetting(EarlyExitGenerator(tgt, exit_threshold=delta), skip_exited=False)
                out.append((f"ELMER hard δ={delta:g}, masked loop", model, task, gen, False))
    if args.elmer_soft:
        model, task = elmer(args.elmer_soft)
        out.append(("ELMER soft floor (bare forward)", model, task, Floor(soft=model.cfg.early_exit == "soft"), True))
        out.append(("ELMER soft", model, task, EarlyExitGenerator(task.target_dictionary), False))
        if model.cfg.early_exit == "soft":
            gen = DecoderSetting(EarlyExitGenerator(task.target_dictionary), screen_argmax=False)
            out.append(("ELMER soft, full fp32 inner argmax", model, task, gen, False))
        if args.bf16_generation_too and dtype == torch.float32:
            # a second copy of the model: the generator casts it to bf16 in place at its first (warm-up) batch
            copy, task = elmer(args.elmer_soft)
            gen = EarlyExitGenerator(task.target_dictionary, bf16=True)
            out.append(("ELMER soft, --bf16-generation", copy, task, gen, False))
    for kind in ("nat", "ar"):
        path = getattr(args, kind)
        if not path and not args.size:
            continue
        model, task = load(path, args.data) if path else untrained(kind, args.data, args.size)
        model = place(model)
        if kind == "nat":
            if length is not None:
                model.decoder.forward_length_prediction = ForcedLength(length)
            gen = task.build_generator([model], argparse.Namespace(iter_decode_max_iter=0))
            out.append(("NAT (fairseq, one pass)", model, task, gen, False))
        else:
            for beam, name in ((1, "AR greedy"), (4, "AR beam 4")):
                gen = task.build_generator([model], generation_config(beam, length))
                out.append((f"{name} (fairseq transformer)", model, task, gen, False))
    return out


# ---------------------------------------------------------------- measurement

def timing_ids(models_tasks, split, limit):
    """The sentence ids of ``split`` every system is timed on: of the sentences whose source every model
    takes whole (within its maximum source positions: others are counted and left out), ``limit`` spread
    evenly over the source lengths (sorted by length, every (n / limit)-th, from the shortest to the
    longest), so the figures are those of the split's inputs, not of its shortest ones (fairseq's batch
    iterator yields the shortest first). ``models_tasks``: (model, task) pairs, the first one's source
    lengths order the sentences."""
    keep, order_sizes = None, None
    for model, task in models_tasks:
        if split not in task.datasets:
            task.load_dataset(split)
        sizes = np.asarray(task.dataset(split).src_sizes)
        limit_src = model.max_positions()
        limit_src = limit_src[0] if isinstance(limit_src, tuple) else limit_src
        fits = sizes <= limit_src if limit_src is not None else np.ones(len(sizes), dtype=bool)
        keep = fits if keep is None else keep & fits
        order_sizes = sizes if order_sizes is None else order_sizes
    ids = np.flatnonzero(keep)
    if len(ids) < len(keep):
        logger.info(f"{split}: {len(keep) - len(ids)} of {len(keep)} sentences left out, their source longer than "
                    "a model's maximum source positions")
    ids = ids[np.argsort(order_sizes[ids], kind="stable")]
    if len(ids) > limit:
        ids = ids[np.linspace(0, len(ids) - 1, limit).round().astype(int)]
    return ids.tolist()


def batches(task, split, ids, batch_size, device):
    """The sentences ``ids`` of ``split`` (``timing_ids``), in that order, collated by ``task``'s dataset into
    batches of ``batch_size``."""
    if split not in task.datasets:
        task.load_dataset(split)
    dataset = task.dataset(split)
    out = []
    for start in range(0, len(ids), batch_size):
        sample = dataset.collater([dataset[i] for i in ids[start:start + batch_size]])
        out.append(utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(model, task, gen, sample, floor):
    if floor:
        if "canvas" not in sample:
            sample["canvas"] = model.initialize_canvas(sample["net_input"]["src_lengths"])
        return gen.generate([model], sample)
    return task.inference_step(gen, [model], sample)


def output_tokens(hypos, d):
    """Tokens written, <s>/</s>/<pad> not counted (the NAT peer's hypotheses keep <s> and </s>)."""
    tokens = torch.cat([h[0]["tokens"] for h in hypos]) if isinstance(hypos, list) else hypos.flatten()
    special = (tokens == d.bos()) | (tokens == d.eos()) | (tokens == d.pad())
    return int((~special).sum())


@contextmanager
def peak_memory(device, record):
    """Peak memory (MiB) the block adds: CUDA peak allocation, or the rise of peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        record["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so new peaks show in RSS
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        ok = True
    except OSError:
        ok = False
    base = _proc_status("VmRSS")
    yield
    record["peak_mib"] = (_proc_status("VmHWM") - base) / 1024 if ok and base else None


def _proc_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        return None
    return None


def measure_all(systems_list, args, device):
    """Every system on the same inputs. Batch-size-1 latency is taken round-robin (each sentence
    by every system in turn, after a warm-up of every system), so that drift in the machine's
    speed falls on all systems alike, each timed call right after an untimed one of the same system on
    the same sentence (warm caches for every system alike); then large-batch throughput and peak memory
    per system."""
    results = [{"system": name} for name, *_ in systems_list]
    times = [[] for _ in systems_list]
    tokens = [0] * len(systems_list)
    exits = [ExitHistogram(getattr(model, "num_exit_layers", None)) for _, model, *_ in systems_list]
    with torch.inference_mode():
        ids = timing_ids([(model, task) for _, model, task, *_ in systems_list], args.split, args.max_sentences)
        per_task = {}
        for _, model, task, gen, floor in systems_list:
            if id(task) not in per_task:
                per_task[id(task)] = batches(task, args.split, ids, 1, device)
        for _, model, task, gen, floor in systems_list:
            for sample in per_task[id(task)][: args.warmup]:
                run_one(model, task, gen, sample, floor)
        n = min(len(v) for v in per_task.values())
        for i in range(n):
            for j, (_, model, task, gen, floor) in enumerate(systems_list):
                sample = per_task[id(task)][i]
                # untimed first: every system is timed with its own weights in the CPU's caches, as a server
                # running one model sees (else the system after another model pays for reloading them, and
                # the rows that share a model ride on the row before)
                run_one(model, task, gen, sample, floor)
                sync(device)
                t0 = time.perf_counter()
                hypos = run_one(model, task, gen, sample, floor)
                sync(device)
                times[j].append((time.perf_counter() - t0) * 1000)
                tokens[j] += output_tokens(hypos, task.target_dictionary)
                if isinstance(hypos, list) and hypos and "exit_layers" in hypos[0][0]:
                    for nbest in hypos:
                        exits[j].update(nbest[0]["exit_layers"].tolist())
        for j, (_, model, task, gen, floor) in enumerate(systems_list):
            res = results[j]
            ordered = sorted(times[j])
            res["ms_median_bs1"] = statistics.median(ordered)
            res["ms_p90_bs1"] = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            res["mean_output_tokens"] = tokens[j] / n
            if exits[j].total:
                res["exit_layer_fractions"] = exits[j].fractions()
                res["mean_exit_layer"] = exits[j].mean()
            big = batches(task, args.split, ids, args.large_batch, device)
            # warm-up on every batch, not only the first: each new shape's first call on CUDA loads and
            # selects kernels (seen on an H200: 340 instead of 9,800 sentences/s for the first system timed in fp16)
            for sample in big:
                run_one(model, task, gen, sample, floor)
            sync(device)
            t0 = time.perf_counter()
            count = 0
            for sample in big:
                run_one(model, task, gen, sample, floor)
                count += sample["nsentences"]
            sync(device)
            res[f"sent_per_s_bs{args.large_batch}"] = count / (time.perf_counter() - t0)
            for bs in args.memory_batches:
                sample = batches(task, args.split, ids[:bs], bs, device)[0]
                record = {}
                with peak_memory(device, record):
                    run_one(model, task, gen, sample, floor)
                res[f"peak_mib_bs{bs}"] = record["peak_mib"]
                res[f"sentences_in_bs{bs}"] = sample["nsentences"]
    return results


def table(results, large_batch, memory_batches):
    ref = next((r for r in results if r["system"] == "ELMER last layer"), results[0])
    head = ["system", "ms/sample bs1 (median)", "p90", f"sent/s bs{large_batch}", "speedup vs ELMER",
            "out tokens"] + [f"peak MiB bs{b}" for b in memory_batches]
    rows = [head]
    for r in results:
        rows.append([
            r["system"], f"{r['ms_median_bs1']:.2f}", f"{r['ms_p90_bs1']:.2f}",
            f"{r[f'sent_per_s_bs{large_batch}']:.1f}", f"{ref['ms_median_bs1'] / r['ms_median_bs1']:.2f}x",
            f"{r['mean_output_tokens']:.1f}",
        ] + [("-" if r.get(f"peak_mib_bs{b}") is None else f"{r[f'peak_mib_bs{b}']:.1f}") for b in memory_batches])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in results:
        if "hard" in r["system"] and "exit_layer_fractions" in r:
            fractions = " ".join(f"L{k}={v:.2f}" for k, v in r["exit_layer_fractions"].items())
            lines.append(f"{r['system']}: exit layers {fractions}, mean {r['mean_exit_layer']:.2f}")
    for name, floor_name in (("ELMER last layer", "ELMER floor"), ("ELMER soft", "ELMER soft floor")):
        gen = next((r for r in results if r["system"] == name), None)
        floor = next((r for r in results if r["system"].startswith(floor_name + " ")), None)
        if gen and floor:
            lines.append(f"{name}: generator overhead over its bare forward pass (bs1 median): "
                         f"{gen['ms_median_bs1'] / floor['ms_median_bs1']:.3f}x")
    return "\n".join(lines)


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="fairseq data-bin with the test split")
    p.add_argument("--split", default="test")
    p.add_argument("--elmer", help="elmer_nat checkpoint (last layer and hard exit)")
    p.add_argument("--elmer-soft", help="elmer_nat checkpoint trained with --early-exit soft")
    p.add_argument("--ar", help="fairseq transformer checkpoint")
    p.add_argument("--nat", help="fairseq nonautoregressive_transformer checkpoint")
    p.add_argument("--train-peers", metavar="DIR", help="train missing AR/NAT peers into DIR first")
    p.add_argument("--peer-updates", type=int, default=700)
    p.add_argument("--size", choices=sorted(SIZES), help="untrained models of this size instead of checkpoints")
    p.add_argument("--thresholds", type=float, nargs="*", default=[1.0, 3.0])
    p.add_argument("--masked-too", action="store_true",
                   help="also time hard exit with the masked layer loop (every token through every layer)")
    p.add_argument("--lengths", type=int, nargs="*", default=[], help="forced output lengths (one table each)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--max-sentences", type=int, default=200,
                   help="sentences timed per setting, spread over the split's source lengths")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--large-batch", type=int, default=64)
    p.add_argument("--memory-batches", type=int, nargs="*", default=[1, 32, 128])
    p.add_argument("--compile", action="store_true", help="also time ELMER with the --compile generator")
    p.add_argument("--bf16-generation-too", action="store_true",
                   help="also time the --elmer-soft model with --bf16-generation (its weights cast to bf16, the "
                   "other systems in --dtype): what fairseq-generate gives an ELMER user on a bf16-capable CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_peers:
        size = args.size or "tiny"
        args.ar = args.ar or train_peer("ar", args.data, args.train_peers, size, args.peer_updates)
        args.nat = args.nat or train_peer("nat", args.data, args.train_peers, size, args.peer_updates)
        if args.size and not (args.elmer or args.elmer_soft):
            raise SystemExit("--train-peers with --size: give the ELMER checkpoint of that size with --elmer")
        args.size = None
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    report = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "tables": []}
    for length in args.lengths or [None]:
        args.length = length
        results = measure_all(systems(args, device, dtype), args, device)
        title = f"output length {'forced to ' + str(length) if length else 'chosen by each system'}"
        print(f"\n== {title} ({device}, {args.dtype}, {torch.get_num_threads()} threads)")
        print(table(results, args.large_batch, args.memory_batches))
        report["tables"].append({"length": length, "results": results})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where the time of one-pass generation goes, at batch size 1 on the given split.

    python scripts/profile_generation.py --data runs/debsum/bin --elmer CKPT [--nat CKPT] [--ar CKPT] \
        --sentences 100 [--json OUT]

For each model, every sentence is generated alone (as scripts/benchmark.py does at batch 1, through
``task.inference_step``) with forward hooks timing the model's parts: the encoder, each decoder layer,
the off-ramps / output projection, soft exit's mixers, and the NAT peer's length predictor. The rest of
the wall-clock ("outside the model's modules": the generator's Python and tensor work around the
modules, the attention masks, fairseq's inference_step) is the difference to the whole call. Prints ms
per sentence and the share of each part; --json writes them. On CPU the calls are synchronous, so the hook
times are the parts' own; on CUDA each hook synchronises (slower, but the shares stay readable).
"""

import argparse
import json
import logging
import statistics
import time
from collections import defaultdict

import torch

from benchmark import batches, generation_config, load, sync, timing_ids

import elmer_fairseq  # noqa: F401

logger = logging.getLogger("profile_generation")


def parts(model):
    """(label, module) for the parts timed; the labels group modules (all decoder layers' mixers, ...)."""
    out = [("encoder", model.encoder)]
    decoder = model.decoder
    for i, layer in enumerate(decoder.layers):
        out.append((f"decoder layer {i + 1}", layer))
    for name, module in decoder.named_modules():
        if name.startswith("off_ramps.") and name.count(".") == 1 or name == "output_projection":
            out.append(("off-ramps / output projection", module))
        elif name.startswith("soft_mixers.") and name.count(".") == 1:
            out.append(("soft-exit mixers (Eq. 12)", module))
        elif name == "embed_length":
            out.append(("length prediction", module))
        elif name == "embed_tokens":
            out.append(("decoder embeddings", module))
    return out


class _Restore:
    """A handle that removes an instance attribute (the timed method) again."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


class PartTimer:
    """Forward pre/post hooks adding each call's wall-clock to its label (nested calls are not counted
    twice: a module inside a timed module is not timed on its own)."""

    def __init__(self, model, device):
        self.device = device
        self.totals = defaultdict(float)
        self.depth = 0
        self.handles = []
        for label, module in parts(model):
            self.handles.append(module.register_forward_pre_hook(self._pre(label)))
            self.handles.append(module.register_forward_hook(self._post(label)))
        self.started = {}
        # fairseq's SequenceGenerator runs the AR encoder through forward_torchscript, which calls
        # forward_scriptable directly (no module hooks); soft exit's screened inner argmax reads the
        # off-ramp's bf16 copy without calling the module: time those methods on their instances
        if hasattr(model.encoder, "forward_torchscript"):
            self._time_method(model.encoder, "forward_torchscript", "encoder")
        if hasattr(model.decoder, "off_ramp_argmax"):
            self._time_method(model.decoder, "off_ramp_argmax", "off-ramps / output projection")

    def _time_method(self, obj, name, label):
        plain, pre, post = getattr(obj, name), self._pre(label), self._post(label)

        def timed(*a, **kw):
            pre(obj, a)
            out = plain(*a, **kw)
            post(obj, a, out)
            return out

        setattr(obj, name, timed)
        self.handles.append(_Restore(obj, name))

    def _pre(self, label):
        def hook(module, args):
            self.depth += 1
            if self.depth == 1:
                sync(self.device)
                self.started[id(module)] = time.perf_counter()
        return hook

    def _post(self, label):
        def hook(module, args, output):
            if self.depth == 1:
                sync(self.device)
                self.totals[label] += time.perf_counter() - self.started.pop(id(module))
            self.depth -= 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def profile(model, task, gen, samples, device, warmup=5):
    """{part: ms per sentence}, plus 'whole call' and 'outside the model's modules'."""
    with torch.no_grad():
        for sample in samples[:warmup]:
            task.inference_step(gen, [model], sample)
    timer = PartTimer(model, device)
    wall = []
    try:
        with torch.no_grad():
            for sample in samples:
                sync(device)
                t0 = time.perf_counter()
                task.inference_step(gen, [model], sample)
                sync(device)
                wall.append(time.perf_counter() - t0)
    finally:
        timer.remove()
    n = len(samples)
    out = {label: 1000 * t / n for label, t in timer.totals.items()}
    out["whole call"] = 1000 * sum(wall) / n
    out["whole call, median"] = 1000 * statistics.median(wall)
    out["outside the model's modules"] = out["whole call"] - sum(1000 * t / n for t in timer.totals.values())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the fairseq-preprocess folder of the checkpoints")
    p.add_argument("--split", default="valid")
    p.add_argument("--elmer", help="an elmer_nat checkpoint (generated with its own --early-exit strategy)")
    p.add_argument("--nat", help="a fairseq nonautoregressive_transformer checkpoint (one pass)")
    p.add_argument("--ar", help="a fairseq transformer checkpoint (greedy)")
    p.add_argument("--sentences", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.elmer or args.nat or args.ar):
        p.error("give at least one of --elmer, --nat, --ar")
    device = torch.device(args.device)
    results = {}
    for kind in ("elmer", "nat", "ar"):
        path = getattr(args, kind)
        if not path:
            continue
        model, task = load(path, args.data)
        model = model.to(device).eval()
        if kind == "elmer":
            gen = task.build_generator([model], None)
        elif kind == "nat":
            gen = task.build_generator([model], argparse.Namespace(iter_decode_max_iter=0))
        else:
            gen = task.build_generator([model], generation_config(1))
        samples = batches(task, args.split, timing_ids([(model, task)], args.split, args.sentences), 1, device)
        results[kind] = profile(model, task, gen, samples, device)
    for kind, figures in results.items():
        whole = figures["whole call"]
        print(f"\n{kind} ({getattr(args, kind)}), batch 1, {args.sentences} sentences of {args.split}, {args.device}")
        for label, ms in figures.items():
            share = "" if label.startswith("whole") else f"{100 * ms / whole:5.1f}%"
            print(f"  {label:<34} {ms:8.3f} ms  {share}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ms_per_sentence": results}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Does ``--autocast-bf16`` keep the loss? A trained ELMER checkpoint's loss on a split, computed by the
task's own validation step in fp32 and under bf16 autocast, on the same batches.

    python scripts/bf16_loss_check.py --path runs/debsum/elmer-soft-kd-glat/checkpoint_last.pt --data runs/debsum/bin

Prints (and with --json writes) both losses in bits per token, their difference, the largest per-batch
difference, and the batch-to-batch standard deviation of the fp32 loss (the scale of "noise").
"""

import argparse
import json
import math

import elmer_fairseq  # noqa: F401  (registers the task; allow-lists fairseq's checkpoint types)
from fairseq import checkpoint_utils


def losses(task, model, criterion, batches, bf16):
    """(loss sum, sample size) of every batch from the task's valid_step, with --autocast-bf16 set to ``bf16``."""
    before = task.cfg.autocast_bf16
    task.cfg.autocast_bf16 = bf16
    try:
        out = []
        for batch in batches:
            loss, size, _ = task.valid_step(batch, model, criterion)
            out.append((float(loss), float(size)))
        return out
    finally:
        task.cfg.autocast_bf16 = before


def compare(task, model, criterion, batches):
    fp32, bf16 = losses(task, model, criterion, batches, False), losses(task, model, criterion, batches, True)
    bits = lambda rows: sum(l for l, _ in rows) / sum(n for _, n in rows) / math.log(2)  # noqa: E731
    per_batch = [l / n / math.log(2) for l, n in fp32]
    mean = sum(per_batch) / len(per_batch)
    return {"fp32_bits": bits(fp32), "bf16_bits": bits(bf16), "diff_bits": bits(bf16) - bits(fp32),
            "max_batch_diff_bits": max(abs(a[0] - b[0]) / a[1] / math.log(2) for a, b in zip(bf16, fp32)),
            "fp32_batch_sd_bits": (sum((x - mean) ** 2 for x in per_batch) / len(per_batch)) ** 0.5,
            "batches": len(batches)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="elmer_nat checkpoint")
    p.add_argument("--data", required=True, help="its fairseq-preprocess folder")
    p.add_argument("--subset", default="valid")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--json")
    args = p.parse_args(argv)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    if not hasattr(task.cfg, "autocast_bf16"):
        raise SystemExit(f"--path {args.path}: its task ({task.__class__.__name__}) has no --autocast-bf16")
    task.load_dataset(args.subset)
    batches = list(task.get_batch_iterator(task.dataset(args.subset), max_tokens=args.max_tokens,
                                           max_positions=(512, 512), ignore_invalid_inputs=True).next_epoch_itr(shuffle=False))
    result = compare(task, models[0], task.build_criterion(cfg.criterion), batches)
    print(f"{args.subset} loss, bits/token: fp32 {result['fp32_bits']:.4f}, bf16 autocast {result['bf16_bits']:.4f} "
          f"(difference {result['diff_bits']:+.4f}; largest per batch {result['max_batch_diff_bits']:.4f}; "
          f"batch-to-batch sd of the fp32 loss {result['fp32_batch_sd_bits']:.3f}; {result['batches']} batches)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, path=args.path, data=args.data, subset=args.subset), f, indent=1)
    return result


if __name__ == "__main__":
    main()

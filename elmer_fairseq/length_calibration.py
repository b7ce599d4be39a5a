"""Choose ``--eos-penalty`` on training pairs, so that one-pass outputs have the references' length.

The first-``</s>`` cut is biased short when the model spreads p(``</s>``) over several positions. A
penalty subtracted from log p(``</s>``) before the argmax lengthens the outputs; this picks the penalty
whose output/reference length ratio (in target pieces, ``</s>`` not counted) on a sample of a *training*
split is nearest to ``--target-ratio``. The split a model is evaluated on is never read::

    python -m elmer_fairseq.length_calibration DATA_BIN --path CKPT --subset train --sentences 1000

prints the ratio at every penalty of the grid and the chosen one (``--json`` writes them). Then generate
with ``--length-rule first-eos --eos-penalty P``. One model pass per batch serves the whole grid.
With ``--collapse-repeats`` the lengths are those after consecutive repeated pieces are collapsed, for
generation with ``--collapse-repeats`` (a larger penalty lengthens outputs partly with repeats).
"""

import argparse
import json
import logging

import numpy as np
import torch
from fairseq import checkpoint_utils, utils

from .early_exit_generator import EarlyExitGenerator

logger = logging.getLogger(__name__)


def lengths_at_penalties(scores, eos_scores, pad, penalties):
    """Output lengths (P, B), ``</s>`` not counted, of the first-``</s>`` cut at each penalty: the
    first position where log p(``</s>``) - penalty beats the best other token, else the canvas."""
    valid = ~pad
    wins = (eos_scores[None] - penalties[:, None, None] > scores[None]) & valid[None]  # (P, B, T)
    width = scores.size(1)
    positions = torch.arange(width, device=scores.device)
    first = torch.where(wins, positions, width).min(-1).values  # (P, B)
    return torch.minimum(first, valid.sum(1)[None])


def collapsed_lengths(tokens, lengths):
    """Lengths (P, B) after ``--collapse-repeats`` (consecutive equal pieces kept once) of the outputs
    ``tokens[b, :lengths[p, b]]``: the number of runs in each prefix."""
    change = torch.ones_like(tokens, dtype=torch.long)
    change[:, 1:] = tokens[:, 1:].ne(tokens[:, :-1]).long()
    runs = change.cumsum(1)  # runs[b, n - 1]: runs in the first n pieces
    prefix = runs.gather(1, (lengths - 1).clamp(min=0).t()).t()
    return torch.where(lengths > 0, prefix, torch.zeros_like(prefix))


def length_table(model, generator, batches, penalties, pad_idx, collapse=False):
    """{penalty: (output pieces, reference pieces)} summed over ``batches`` (fairseq samples); with
    ``collapse``, output pieces after consecutive repeats are collapsed (as ``--collapse-repeats``)."""
    penalties_t = torch.tensor(penalties, dtype=torch.float)
    hyp = torch.zeros(len(penalties), dtype=torch.long)
    ref = 0
    for sample in batches:
        net = sample["net_input"]
        tokens, scores, eos_scores, _, pad = generator.position_scores(model, net["src_tokens"], net["src_lengths"])
        lengths = lengths_at_penalties(scores.float(), eos_scores.float(), pad, penalties_t.to(scores.device))
        if collapse:
            lengths = collapsed_lengths(tokens, lengths)
        hyp += lengths.sum(1).cpu()
        ref += int((sample["target"].ne(pad_idx).sum(1) - 1).sum())  # the reference's </s> not counted
    return {p: (int(h), ref) for p, h in zip(penalties, hyp.tolist())}


def choose_penalty(table, target_ratio=1.0):
    """The penalty whose length ratio is nearest ``target_ratio`` (the smallest such penalty on a tie)."""
    return min(sorted(table), key=lambda p: abs(table[p][0] / max(table[p][1], 1) - target_ratio))


def sample_batches(dataset, n, batch_size, seed=0):
    """``n`` pairs drawn without replacement (fixed seed), collated ``batch_size`` at a time."""
    rng = np.random.RandomState(seed)
    picks = np.sort(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False))
    for start in range(0, len(picks), batch_size):
        yield dataset.collater([dataset[int(i)] for i in picks[start:start + batch_size]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="the fairseq-preprocess directory the model was trained on")
    p.add_argument("--path", required=True, help="the elmer_nat checkpoint")
    p.add_argument("--subset", default="train", help="a training split (never the one you report)")
    p.add_argument("--sentences", type=int, default=1000, help="pairs sampled from --subset")
    p.add_argument("--penalties", default="0:8:0.25", help="grid START:STOP:STEP (STOP included)")
    p.add_argument("--target-ratio", type=float, default=1.0, help="wanted output/reference length ratio")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the table and the choice here")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    p.add_argument("--collapse-repeats", action="store_true",
                   help="match the length of outputs after consecutive repeated pieces are collapsed (for "
                        "generation with --collapse-repeats)")
    args = p.parse_args(argv)
    if args.subset in ("valid", "test"):
        p.error(f"--subset {args.subset}: calibrate on a training split, not on the one you report")
    try:
        start, stop, step = (float(x) for x in args.penalties.split(":"))
    except ValueError:
        p.error(f"--penalties must be START:STOP:STEP, got {args.penalties!r}")
    if step <= 0 or stop < start:
        p.error(f"--penalties {args.penalties}: need STEP > 0 and STOP >= START")
    penalties = [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import elmer_fairseq  # noqa: F401  (registers the plugin, allow-lists checkpoint types)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    if torch.cuda.is_available() and not args.cpu:
        model.cuda()
    task.load_dataset(args.subset)
    generator = EarlyExitGenerator(task.target_dictionary)
    device = next(model.parameters()).device
    batches = (utils.move_to_cuda(b) if device.type == "cuda" else b
               for b in sample_batches(task.dataset(args.subset), args.sentences, args.batch_size))
    table = length_table(model, generator, batches, penalties, task.target_dictionary.pad(), args.collapse_repeats)
    chosen = choose_penalty(table, args.target_ratio)
    for pen in penalties:
        h, r = table[pen]
        print(f"eos-penalty {pen:6.2f}  output/reference pieces {h}/{r} = {h / max(r, 1):.3f}"
              + ("  <- chosen" if pen == chosen else ""))
    print(f"chosen --eos-penalty {chosen}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eos_penalty": chosen, "subset": args.subset, "sentences": args.sentences,
                       "target_ratio": args.target_ratio, "collapse_repeats": args.collapse_repeats,
                       "table": {str(k): {"hyp_pieces": v[0], "ref_pieces": v[1]} for k, v in table.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

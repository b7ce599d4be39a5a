"""Choose ``--eos-penalty`` (or ``--length-quantile``) on training pairs, so that one-pass outputs have
the references' length.

The first-``</s>`` cut is biased short when the model spreads p(``</s>``) over several positions. A
penalty subtracted from log p(``</s>``) before the argmax lengthens the outputs; this picks the penalty
whose output/reference length ratio (in target pieces, ``</s>`` not counted) on a sample of a *training*
split is nearest to ``--target-ratio``. The split a model is evaluated on is never read::

    python -m elmer_fairseq.length_calibration DATA_BIN --path CKPT --subset train --sentences 1000

prints the ratio at every penalty of the grid and the chosen one (``--json`` writes them). Then generate
with ``--length-rule first-eos --eos-penalty P``. One model pass per batch serves the whole grid.
With ``--collapse-repeats`` the lengths are those after consecutive repeated pieces are collapsed, for
generation with ``--collapse-repeats`` (a larger penalty lengthens outputs partly with repeats).
``--unit words`` counts sentencepiece words (what elmer-score's length ratio counts) instead of pieces.
``--no-repeat-neighbours K`` calibrates for generation with the same option (each position's token
and score are then the ones that rule picks).
``--rule quantile`` calibrates ``--length-rule quantile`` instead: the grid (``--quantiles``) holds levels of
the length distribution the per-position p(``</s>``) defines (``choose_lengths``), and the output ends at
the first length whose cumulative probability reaches the level; generate with
``--length-rule quantile --length-quantile Q``.
``--rule blank-penalty`` calibrates a model trained with ``--ctc`` (the only rule for one): the grid
(``--penalties``) holds ``--blank-penalty`` values, each output is the canvas read as CTC reads it with
that penalty on log p(blank); generate with ``--blank-penalty P``.
"""

import argparse
import json
import logging

import numpy as np
import torch
from fairseq import checkpoint_utils, utils

from .ctc import collapse as ctc_collapse
from .early_exit_generator import EarlyExitGenerator, ctc_canvas, length_cdf, length_log_probs

logger = logging.getLogger(__name__)

# the length rule calibrated -> the generation option it sets (also the key of the choice in --json)
KNOBS = {"first-eos": "eos-penalty", "quantile": "length-quantile", "blank-penalty": "blank-penalty"}


def lengths_at_penalties(scores, eos_scores, pad, penalties):
    """Output lengths (P, B), ``</s>`` not counted, of the first-``</s>`` cut at each penalty: the
    first position where log p(``</s>``) - penalty beats the best other token, else the canvas."""
    valid = ~pad
    wins = (eos_scores[None] - penalties[:, None, None] > scores[None]) & valid[None]  # (P, B, T)
    width = scores.size(1)
    positions = torch.arange(width, device=scores.device)
    first = torch.where(wins, positions, width).min(-1).values  # (P, B)
    return torch.minimum(first, valid.sum(1)[None])


def lengths_at_quantiles(eos_scores, pad, quantiles, post_eos):
    """Output lengths (Q, B), ``</s>`` not counted, of ``--length-rule quantile`` at each level in
    ``quantiles`` (Q,): the first length whose cumulative probability under ``length_log_probs``
    reaches the level (``choose_lengths`` for one level)."""
    valid = ~pad
    cdf = length_cdf(length_log_probs(eos_scores, valid, post_eos), valid)  # (B, T)
    reached = (cdf[None] >= quantiles[:, None, None]) & valid[None]  # (Q, B, T)
    return reached.float().argmax(-1)


class WordMarks:
    """Per symbol of a sentencepiece dictionary (bool (V,) tensors), what word counting needs
    (``--unit words``, what elmer-score and the issue's hypothesis/reference ratio count): ``lead``,
    it starts with ``▁`` (a space before its text); ``text``, it has a character other than ``▁``;
    ``trail``, it ends with ``▁``. Refuses a dictionary without sentencepiece pieces."""

    def __init__(self, dictionary):
        symbols = dictionary.symbols
        self.lead = torch.tensor([sym.startswith("\u2581") for sym in symbols], dtype=torch.bool)
        if not self.lead.any():
            raise ValueError("--unit words counts sentencepiece words (pieces starting with \u2581); this "
                             "dictionary has none: use --unit pieces")
        self.text = torch.tensor([bool(sym.strip("\u2581")) for sym in symbols], dtype=torch.bool)
        self.trail = torch.tensor([sym.endswith("\u2581") for sym in symbols], dtype=torch.bool)


def counted_lengths(tokens, lengths, collapse=False, marks=None):
    """Lengths (P, B) of the outputs ``tokens[b, :lengths[p, b]]`` as written: with ``collapse``, after
    ``--collapse-repeats`` (consecutive equal pieces kept once); with ``marks`` (``WordMarks``), in
    words instead of pieces: a kept piece with text begins a word when a space precedes it (its own
    ``▁`` or the previous piece's) or no text came before it."""
    counts = torch.ones_like(tokens, dtype=torch.bool)
    if collapse:
        counts[:, 1:] = tokens[:, 1:].ne(tokens[:, :-1])
    if marks is not None:
        text = marks.text.to(tokens.device)[tokens]
        # a dropped repeat has its predecessor's token, so the previous piece and the text seen so far
        # are the same with or without the collapse
        spaced = marks.lead.to(tokens.device)[tokens]
        spaced[:, 1:] |= marks.trail.to(tokens.device)[tokens[:, :-1]]
        first_text = (text.long().cumsum(1) - text.long()).eq(0)
        counts &= text & (spaced | first_text)
    running = counts.long().cumsum(1)  # running[b, n - 1]: counted units in the first n pieces
    prefix = running.gather(1, (lengths - 1).clamp(min=0).t()).t()
    return torch.where(lengths > 0, prefix, torch.zeros_like(prefix))


def ctc_lengths_at_penalties(tokens, scores, blank_scores, pad, penalties, blank, marks=None):
    """Output lengths (P, B) of a --ctc canvas read at each ``--blank-penalty`` in ``penalties`` (P,)
    (``ctc_canvas`` then ``ctc.collapse``, as generation reads it), in pieces, or in words with
    ``marks``. One reading per grid value, each vectorised over the batch."""
    out = []
    for penalty in penalties.tolist():
        labels, label_scores = ctc_canvas(tokens, scores, blank_scores, blank, penalty)
        written, _, lengths = ctc_collapse(labels, label_scores, ~pad, blank)
        out.append(lengths if marks is None else counted_lengths(written, lengths[None], marks=marks)[0])
    return torch.stack(out)


def length_table(model, generator, batches, penalties, pad_idx, collapse=False, marks=None, rule="first-eos"):
    """{grid value: (output length, reference length)} summed over ``batches`` (fairseq samples), in
    pieces, or in words with ``marks`` (``WordMarks``); with ``collapse``, outputs are counted
    after consecutive repeats are collapsed (as ``--collapse-repeats``). The grid values are
    ``--eos-penalty`` values (``rule`` first-eos), ``--length-quantile`` levels (``rule`` quantile) or
    ``--blank-penalty`` values (``rule`` blank-penalty, a --ctc model)."""
    penalties_t = torch.tensor(penalties, dtype=torch.float)
    hyp = torch.zeros(len(penalties), dtype=torch.long)
    ref = 0
    for sample in batches:
        net = sample["net_input"]
        tokens, scores, eos_scores, _, pad = generator.position_scores(model, net["src_tokens"], net["src_lengths"])
        grid = penalties_t.to(scores.device)
        if rule == "blank-penalty":  # eos_scores: log p(blank); each reading counted in its own tokens
            lengths = ctc_lengths_at_penalties(tokens, scores.float(), eos_scores.float(), pad, grid,
                                               model.decoder.mask_idx, marks)
        else:
            if rule == "quantile":
                lengths = lengths_at_quantiles(eos_scores.float(), pad, grid, model.cfg.post_eos)
            else:
                lengths = lengths_at_penalties(scores.float(), eos_scores.float(), pad, grid)
            if collapse or marks is not None:
                lengths = counted_lengths(tokens, lengths, collapse, marks)
        hyp += lengths.sum(1).cpu()
        target = sample["target"]
        ref_lengths = target.ne(pad_idx).sum(1) - 1  # the reference's </s> not counted
        if marks is not None:
            ref_lengths = counted_lengths(target, ref_lengths[None], marks=marks)[0]
        ref += int(ref_lengths.sum())
    return {p: (int(h), ref) for p, h in zip(penalties, hyp.tolist())}


def choose_penalty(table, target_ratio=1.0):
    """The grid value (penalty or quantile) whose length ratio is nearest ``target_ratio`` (the smallest
    on a tie)."""
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
    p.add_argument("--rule", choices=sorted(KNOBS), default="first-eos",
                   help="the length rule calibrated: first-eos (its --eos-penalty), quantile (its --length-quantile) "
                   "or, for a model trained with --ctc, blank-penalty (its --blank-penalty)")
    p.add_argument("--penalties", default="0:8:0.25",
                   help="--rule first-eos or blank-penalty: grid START:STOP:STEP (STOP included)")
    p.add_argument("--quantiles", default="0.5:0.995:0.005",
                   help="--rule quantile: grid START:STOP:STEP of levels, each strictly between 0 and 1")
    p.add_argument("--target-ratio", type=float, default=1.0, help="wanted output/reference length ratio")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the table and the choice here")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    p.add_argument("--collapse-repeats", action="store_true",
                   help="match the length of outputs after consecutive repeated pieces are collapsed (for "
                        "generation with --collapse-repeats)")
    p.add_argument("--unit", choices=("pieces", "words"), default="pieces",
                   help="count lengths in target pieces, or in words (sentencepiece dictionaries: what elmer-score's "
                        "hypothesis/reference ratio counts)")
    p.add_argument("--no-repeat-neighbours", type=int, default=0, metavar="K",
                   help="calibrate for generation with --no-repeat-neighbours K (0: off)")
    args = p.parse_args(argv)
    if args.subset in ("valid", "test"):
        p.error(f"--subset {args.subset}: calibrate on a training split, not on the one you report")
    flag = "--quantiles" if args.rule == "quantile" else "--penalties"
    spec = args.quantiles if args.rule == "quantile" else args.penalties
    try:
        start, stop, step = (float(x) for x in spec.split(":"))
    except ValueError:
        p.error(f"{flag} must be START:STOP:STEP, got {spec!r}")
    if step <= 0 or stop < start:
        p.error(f"{flag} {spec}: need STEP > 0 and STOP >= START")
    if args.rule == "quantile" and not (0 < start and stop < 1):
        p.error(f"{flag} {spec}: levels must lie strictly between 0 and 1")
    penalties = [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import elmer_fairseq  # noqa: F401  (registers the plugin, allow-lists checkpoint types)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    if getattr(model.cfg, "ctc", False) != (args.rule == "blank-penalty"):
        p.error(f"--rule {args.rule}: {args.path} was trained with" + (" --ctc: its outputs have no </s> to move; "
                "calibrate --rule blank-penalty" if model.cfg.ctc else "out --ctc: --rule blank-penalty is for "
                "--ctc models"))
    if args.rule == "blank-penalty" and (args.collapse_repeats or args.no_repeat_neighbours):
        p.error("--collapse-repeats / --no-repeat-neighbours: not for a --ctc model (CTC merges repeats itself)")
    if torch.cuda.is_available() and not args.cpu:
        model.cuda()
    task.load_dataset(args.subset)
    generator = EarlyExitGenerator(task.target_dictionary, no_repeat_neighbours=args.no_repeat_neighbours)
    device = next(model.parameters()).device
    batches = (utils.move_to_cuda(b) if device.type == "cuda" else b
               for b in sample_batches(task.dataset(args.subset), args.sentences, args.batch_size))
    try:
        marks = WordMarks(task.target_dictionary) if args.unit == "words" else None
    except ValueError as e:
        p.error(str(e))
    table = length_table(model, generator, batches, penalties, task.target_dictionary.pad(), args.collapse_repeats,
                         marks, args.rule)
    chosen = choose_penalty(table, args.target_ratio)
    option = KNOBS[args.rule]
    for pen in penalties:
        h, r = table[pen]
        print(f"{option} {pen:6.3f}  output/reference {args.unit} {h}/{r} = {h / max(r, 1):.3f}"
              + ("  <- chosen" if pen == chosen else ""))
    print(f"chosen --{option} {chosen}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({option.replace("-", "_"): chosen, "checkpoint": args.path, "rule": args.rule, "subset": args.subset, "sentences": args.sentences,
                       "target_ratio": args.target_ratio, "collapse_repeats": args.collapse_repeats,
                       "no_repeat_neighbours": args.no_repeat_neighbours, "unit": args.unit,
                       "table": {str(k): {f"hyp_{args.unit}": v[0], f"ref_{args.unit}": v[1]} for k, v in table.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

"""Sequence-level knowledge distillation data (Kim & Rush, 2016) from a ``fairseq-generate`` log.

``scripts/distill.sh`` beam-decodes a training split with an autoregressive teacher; this module turns
that log into the ``(source, teacher output)`` pair files ``fairseq-preprocess`` binarizes::

    python -m elmer_fairseq.distill GENERATE_LOG OUT_PREFIX --expect 50536

writes ``OUT_PREFIX.src`` and ``OUT_PREFIX.tgt`` (pieces, one pair a line, in sentence-id order). Every
id 0..N-1 must be there: a sentence the generator skipped is an error, not a silent drop.
"""

import argparse
import sys

from .generation_io import read_generate_log


def triples_from_generate_log(lines):
    """``[(source, hypothesis, reference)]`` by sentence id from S-/H-/T- lines (the first H- of an id,
    the best; the reference is None when the log has no T- line)."""
    found = read_generate_log(lines)
    src, hyp, ref = found["S"], found["H"], found["T"]
    missing = sorted(set(src) ^ set(hyp))
    if missing:
        raise ValueError(f"{len(missing)} sentence id(s) have a source or a hypothesis but not both, e.g. {missing[:5]}")
    return [(src[i], hyp[i], ref.get(i)) for i in sorted(src)]


def pairs_from_generate_log(lines):
    """``[(source, hypothesis)]`` by sentence id from S-/H- lines (the first H- of an id, the best)."""
    return [(s, h) for s, h, _ in triples_from_generate_log(lines)]


def repeat_rate(pieces):
    """Share of pieces equal to the piece before them."""
    return sum(a == b for a, b in zip(pieces, pieces[1:])) / max(len(pieces), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("generate_log", help="fairseq-generate output on the training split (no --post-process)")
    p.add_argument("out_prefix", help="writes OUT_PREFIX.src and OUT_PREFIX.tgt")
    p.add_argument("--expect", type=int, help="the number of training pairs; fewer is an error naming the gap")
    p.add_argument("--collapse-repeats", action="store_true",
                   help="drop consecutive repeated pieces from the teacher's outputs (an undertrained teacher's beam "
                   "search loops: 'ir ir ir'); counted")
    p.add_argument("--max-repeat-rate", type=float, metavar="R",
                   help="keep the reference target (the log's T- line) where the teacher's output is empty or more "
                   "than R of its pieces repeat the piece before (a looping teacher); counted. Applied before "
                   "--collapse-repeats")
    args = p.parse_args(argv)
    with open(args.generate_log, encoding="utf-8") as f:
        triples = triples_from_generate_log(f)
    kept_reference = 0
    if args.max_repeat_rate is not None:
        if any(r is None for _, _, r in triples):
            sys.exit(f"distill: --max-repeat-rate needs the references, but {args.generate_log} lacks T- lines")
        chosen = []
        for s, h, r in triples:
            pieces = h.split()
            if not pieces or repeat_rate(pieces) > args.max_repeat_rate:
                kept_reference += 1
                h = r
            chosen.append((s, h))
        pairs = chosen
    else:
        pairs = [(s, h) for s, h, _ in triples]
    if args.expect is not None and len(pairs) != args.expect:
        sys.exit(f"distill: {args.generate_log} has {len(pairs)} pairs but the training split has {args.expect}: "
                 "did fairseq-generate skip inputs (--skip-invalid-size-inputs-valid-test, max positions)?")
    dropped = 0
    if args.collapse_repeats:
        cleaned = []
        for s, h in pairs:
            pieces = h.split()
            kept = [p for i, p in enumerate(pieces) if i == 0 or p != pieces[i - 1]]
            dropped += len(pieces) - len(kept)
            cleaned.append((s, " ".join(kept)))
        pairs = cleaned
    empty = sum(1 for _, h in pairs if not h.strip())
    with open(args.out_prefix + ".src", "w", encoding="utf-8") as fs, open(args.out_prefix + ".tgt", "w", encoding="utf-8") as ft:
        for s, h in pairs:
            fs.write(s + "\n")
            ft.write(h + "\n")
    notes = [f"{empty} empty targets, kept"]
    if args.max_repeat_rate is not None:
        notes.append(f"{kept_reference} references kept where the teacher looped or wrote nothing "
                     f"(repeat rate > {args.max_repeat_rate})")
    if args.collapse_repeats:
        notes.append(f"{dropped} consecutive repeated pieces dropped")
    print(f"distill: {len(pairs)} pairs written to {args.out_prefix}.{{src,tgt}} ({'; '.join(notes)})")


if __name__ == "__main__":
    main()

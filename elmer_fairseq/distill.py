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


def triples_from_generate_log(lines, nbest=False):
    """``[(source, hypothesis, reference)]`` by sentence id from S-/H-/T- lines (the first H- of an id,
    the best; with ``nbest`` the list of an id's hypotheses, best first; the reference is None when the
    log has no T- line)."""
    found = read_generate_log(lines, nbest=nbest)
    src, hyp, ref = found["S"], found["H"], found["T"]
    missing = sorted(set(src) ^ set(hyp))
    if missing:
        raise ValueError(f"{len(missing)} sentence id(s) have a source or a hypothesis but not both, e.g. {missing[:5]}")
    return [(src[i], hyp[i], ref.get(i)) for i in sorted(src)]


def pairs_from_generate_log(lines):
    """``[(source, hypothesis)]`` by sentence id from S-/H- lines (the first H- of an id, the best)."""
    return [(s, h) for s, h, _ in triples_from_generate_log(lines)]


def lcs_f1(hypothesis, reference):
    """F1 of the longest common subsequence of two piece lists (ROUGE-L's F-measure with beta 1, over
    pieces); 0 when either is empty."""
    if not hypothesis or not reference:
        return 0.0
    row = [0] * (len(reference) + 1)
    for h in hypothesis:
        diagonal = 0
        for j, r in enumerate(reference, 1):
            diagonal, row[j] = row[j], diagonal + 1 if h == r else max(row[j], row[j - 1])
    lcs = row[-1]
    return 2 * lcs / (len(hypothesis) + len(reference))


def nearest_to_reference(candidates, reference):
    """Index of the candidate (space-separated pieces) with the highest ``lcs_f1`` against the reference;
    ties go to the earlier candidate (the teacher's order)."""
    ref = reference.split()
    scores = [lcs_f1(c.split(), ref) for c in candidates]
    return scores.index(max(scores))


def mean_length(sequences):
    return sum(map(len, sequences)) / max(len(sequences), 1)


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
    p.add_argument("--select-by-reference", action="store_true",
                   help="the log holds the teacher's n-best (--nbest N): keep the hypothesis nearest the reference "
                   "(LCS F1 over pieces, ties to the teacher's order) instead of the first; counted")
    args = p.parse_args(argv)
    with open(args.generate_log, encoding="utf-8") as f:
        triples = triples_from_generate_log(f, nbest=args.select_by_reference)
    notes = []
    if args.select_by_reference:
        if any(r is None for _, _, r in triples):
            sys.exit(f"distill: --select-by-reference needs the references, but {args.generate_log} lacks T- lines")
        picks = [nearest_to_reference(h, r) for _, h, r in triples]
        n_best = max(len(h) for _, h, _ in triples)
        first = [h[0].split() for _, h, _ in triples]
        triples = [(s, h[k], r) for (s, h, r), k in zip(triples, picks)]
        chosen, refs = [h.split() for _, h, _ in triples], [r.split() for _, _, r in triples]
        notes.append(f"{sum(k > 0 for k in picks)} targets are not the teacher's first hypothesis (nearest the "
                     f"reference among up to {n_best}); pieces per target {mean_length(first):.2f} first, "
                     f"{mean_length(chosen):.2f} chosen, references {mean_length(refs):.2f}")
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
    notes.insert(0, f"{empty} empty targets, kept")
    if args.max_repeat_rate is not None:
        notes.append(f"{kept_reference} references kept where the teacher looped or wrote nothing "
                     f"(repeat rate > {args.max_repeat_rate})")
    if args.collapse_repeats:
        notes.append(f"{dropped} consecutive repeated pieces dropped")
    print(f"distill: {len(pairs)} pairs written to {args.out_prefix}.{{src,tgt}} ({'; '.join(notes)})")


if __name__ == "__main__":
    main()

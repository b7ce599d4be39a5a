#!/usr/bin/env python3
"""Build the bundled sample corpus: Python standard-library docstrings.

Each pair is (docstring body -> its first-line summary), a small real
summarisation task. The corpus is frozen in ``data-bin/sample-raw/`` so that
results do not depend on the Python version that runs the demo; run this
script again only to rebuild it on purpose::

    python scripts/make_sample_data.py --out data-bin/sample-raw

Every filter below is counted and printed: nothing is dropped silently.
"""

import argparse
import ast
import collections
import inspect
import os
import random
import re
import sysconfig

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def iter_docstrings(stdlib):
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)
                ):
                    doc = ast.get_docstring(node, clean=False)
                    if doc:
                        yield inspect.cleandoc(doc)


def normalise(text):
    return re.sub(r"\s+", " ", text).strip()


def split_docstring(doc, counts, max_body_words):
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paragraphs) == 1:
        # "Summary line.\nMore text." with no blank line: the first line is the summary
        # when it is a full sentence.
        first, _, rest = paragraphs[0].partition("\n")
        if not first.rstrip().endswith(".") or not rest.strip():
            counts["no body"] += 1
            return None
        paragraphs = [first, rest]
    summary = normalise(paragraphs[0])
    body_pars = [p for p in paragraphs[1:] if ">>>" not in p and "::" not in p]
    body = normalise(" ".join(body_pars))
    n_sum, n_body = len(summary.split()), len(body.split())
    if not 3 <= n_sum <= 25:
        counts["summary not 3-25 words"] += 1
        return None
    if n_body < 8:
        counts["body under 8 words"] += 1
        return None
    if n_body > max_body_words:
        counts[f"body over {max_body_words} words"] += 1
        return None
    return body, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data-bin/sample-raw", help="output folder")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--valid", type=int, default=200, help="pairs in the valid split")
    parser.add_argument("--test", type=int, default=200, help="pairs in the test split")
    parser.add_argument("--max-body-words", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    counts = collections.Counter()
    seen, pairs = set(), []
    for doc in iter_docstrings(args.stdlib):
        counts["docstrings"] += 1
        pair = split_docstring(doc, counts, args.max_body_words)
        if pair is None:
            continue
        if pair in seen:
            counts["duplicate"] += 1
            continue
        seen.add(pair)
        pairs.append(pair)
    random.Random(args.seed).shuffle(pairs)
    splits = {
        "test": pairs[: args.test],
        "valid": pairs[args.test : args.test + args.valid],
        "train": pairs[args.test + args.valid :],
    }
    os.makedirs(args.out, exist_ok=True)
    for split, rows in splits.items():
        for side, idx in (("src", 0), ("tgt", 1)):
            with open(os.path.join(args.out, f"{split}.{side}"), "w", encoding="utf-8") as f:
                f.writelines(row[idx] + "\n" for row in rows)
        print(f"{split}: {len(rows)} pairs")
    for key, value in sorted(counts.items()):
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Released dataset files -> plain-text pairs {train,valid,test}.{src,tgt} (one example a line).

    python scripts/prepare_dataset.py xsum|squad_qg|personachat RAW_DIR OUT_DIR

Accepted layouts (the first one found is used):

xsum
  * GLGE/BANG: train.src train.tgt dev.src (or valid.src) dev.tgt test.src test.tgt
    (GLGE: https://github.com/microsoft/glge, "xsum" data)
  * official: XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json and the per-article files <id>.summary
    (anywhere below RAW_DIR, e.g. bbc-summary-data/), from https://github.com/EdinburghNLP/XSum;
    source = the [SN]RESTBODY[SN] section, target = [SN]FIRST-SENTENCE[SN]
squad_qg  (input = answer [SEP] passage, output = question)
  * GLGE: train/dev/test .src/.tgt, already "answer [SEP] passage" -> question; the paper's split
    (Table 5: 75,722 / 10,570 / 11,877)
  * SQuAD v1.1 JSON: train-v1.1.json, dev-v1.1.json (https://rajpurkar.github.io/SQuAD-explorer/):
    train articles -> train (every 10th article -> valid), dev-v1.1.json -> test. NOT the paper's split.
personachat  (input = persona profile [SEP] dialogue history, output = response)
  * GLGE: train/dev/test .src/.tgt
  * ParlAI text format: train_self_original.txt, valid_self_original.txt, test_self_original.txt
    (ParlAI's ConvAI2/PersonaChat download); no test file: the second half of valid's dialogues is test.
    History turns are joined by " [SEP] " after the profile.

Empty lines in GLGE files are kept and counted; missing or unreadable files raise an error naming them.
"""

import glob
import json
import logging
import os
import sys

logger = logging.getLogger("prepare_dataset")
SEP = " [SEP] "
SPLITS = ("train", "valid", "test")
PAPER_SIZES = {"xsum": (204045, 11332, 11334), "squad_qg": (75722, 10570, 11877),
               "personachat": (122499, 14602, 14056)}


def clean(text):
    return " ".join(text.split())


def glge(raw):
    """{split: (sources, targets)} from GLGE's layout, or None if it is not there."""
    names = {"train": "train", "valid": "dev" if os.path.exists(os.path.join(raw, "dev.src")) else "valid",
             "test": "test"}
    paths = {s: [os.path.join(raw, f"{names[s]}.{side}") for side in ("src", "tgt")] for s in SPLITS}
    if not all(os.path.exists(p) for pair in paths.values() for p in pair):
        return None
    out = {}
    for split, (src, tgt) in paths.items():
        with open(src, encoding="utf-8") as fs, open(tgt, encoding="utf-8") as ft:
            s, t = [clean(x) for x in fs], [clean(x) for x in ft]
        if len(s) != len(t):
            raise ValueError(f"{src} has {len(s)} lines but {tgt} has {len(t)}")
        out[split] = (s, t)
    return out


def xsum_official(raw):
    split_files = glob.glob(os.path.join(raw, "**", "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"), recursive=True)
    if not split_files:
        return None
    with open(split_files[0], encoding="utf-8") as f:
        ids = json.load(f)
    files = {os.path.basename(p)[: -len(".summary")]: p
             for p in glob.glob(os.path.join(raw, "**", "*.summary"), recursive=True)}
    out = {}
    for split, key in (("train", "train"), ("valid", "validation"), ("test", "test")):
        sources, targets, missing, empty = [], [], 0, 0
        for doc_id in ids[key]:
            path = files.get(str(doc_id))
            if path is None:
                missing += 1
                continue
            sections = parse_summary_file(path)
            body, summary = clean(sections.get("RESTBODY", "")), clean(sections.get("FIRST-SENTENCE", ""))
            if not body or not summary:
                empty += 1
                continue
            sources.append(body)
            targets.append(summary)
        if missing or empty:
            logger.warning(f"xsum {split}: {missing} ids without a .summary file, {empty} with an empty "
                           f"body or summary: skipped, {len(sources)} kept")
        out[split] = (sources, targets)
    return out


def parse_summary_file(path):
    """The [SN]NAME[SN] sections of an XSum .summary file."""
    sections, name = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("[SN]") and line.endswith("[SN]") and len(line) > 8:
                name = line[4:-4]
                sections[name] = ""
            elif name is not None:
                sections[name] += " " + line
    return sections


def squad_json(raw):
    train, dev = (os.path.join(raw, f) for f in ("train-v1.1.json", "dev-v1.1.json"))
    if not (os.path.exists(train) and os.path.exists(dev)):
        return None
    logger.warning("squad_qg: raw SQuAD v1.1 JSON gives train/valid/test from train (articles, every 10th to "
                   "valid) and dev; this is NOT the paper's split (Table 5): use GLGE's files for that")

    def pairs(path, keep=lambda i: True):
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
        src, tgt = [], []
        for i, article in enumerate(articles):
            if not keep(i):
                continue
            for paragraph in article["paragraphs"]:
                context = clean(paragraph["context"])
                for qa in paragraph["qas"]:
                    answer = clean(qa["answers"][0]["text"]) if qa["answers"] else ""
                    src.append(f"{answer}{SEP}{context}")
                    tgt.append(clean(qa["question"]))
        return src, tgt

    return {"train": pairs(train, lambda i: i % 10 != 9), "valid": pairs(train, lambda i: i % 10 == 9),
            "test": pairs(dev)}


def parlai_dialogues(path):
    """[(persona lines, [(query, response), ...])] from ParlAI's numbered text format."""
    dialogues = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            number, _, text = line.partition(" ")
            if not number.isdigit():
                raise ValueError(f"{path}: a ParlAI line starts with its number, got {line[:40]!r}")
            if number == "1" or not dialogues:
                dialogues.append(([], []))
            persona, turns = dialogues[-1]
            if text.startswith("your persona:"):
                persona.append(clean(text[len("your persona:"):]))
            else:
                parts = text.split("\t")
                if len(parts) < 2:
                    raise ValueError(f"{path}: a dialogue line needs query<TAB>response, got {line[:60]!r}")
                turns.append((clean(parts[0]), clean(parts[1])))
    return dialogues


def personachat_parlai(raw):
    names = {s: os.path.join(raw, f"{s}_self_original.txt") for s in SPLITS}
    if not (os.path.exists(names["train"]) and os.path.exists(names["valid"])):
        return None

    def pairs(dialogues):
        src, tgt = [], []
        for persona, turns in dialogues:
            history = []
            for query, response in turns:
                history.append(query)
                src.append(" ".join(persona) + SEP + SEP.join(history))
                tgt.append(response)
                history.append(response)
        return src, tgt

    train, valid = parlai_dialogues(names["train"]), parlai_dialogues(names["valid"])
    if os.path.exists(names["test"]):
        test = parlai_dialogues(names["test"])
    else:
        logger.warning("personachat: no test_self_original.txt: the second half of valid's dialogues is test")
        valid, test = valid[: len(valid) // 2], valid[len(valid) // 2 :]
    return {"train": pairs(train), "valid": pairs(valid), "test": pairs(test)}


READERS = {"xsum": [glge, xsum_official], "squad_qg": [glge, squad_json], "personachat": [glge, personachat_parlai]}


def prepare(dataset, raw, out):
    if dataset not in READERS:
        raise ValueError(f"dataset must be one of {sorted(READERS)}, got {dataset!r}")
    if not os.path.isdir(raw):
        raise FileNotFoundError(f"{raw}: not a folder (see scripts/prepare_dataset.py --help for the files)")
    for reader in READERS[dataset]:
        data = reader(raw)
        if data is not None:
            break
    else:
        raise FileNotFoundError(f"{raw}: none of the layouts {dataset} accepts was found:\n" + __doc__)
    os.makedirs(out, exist_ok=True)
    for split in SPLITS:
        src, tgt = data[split]
        empty = sum(1 for s, t in zip(src, tgt) if not s or not t)
        if empty:
            logger.warning(f"{dataset} {split}: {empty} pairs with an empty side (kept)")
        for side, lines in (("src", src), ("tgt", tgt)):
            with open(os.path.join(out, f"{split}.{side}"), "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
    sizes = tuple(len(data[s][0]) for s in SPLITS)
    note = "" if sizes == PAPER_SIZES[dataset] else f" (the paper's Table 5: {PAPER_SIZES[dataset]})"
    print(f"{dataset}: train/valid/test = {sizes}{note}")
    return sizes


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if len(sys.argv) != 4 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    try:
        prepare(*sys.argv[1:])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"prepare_dataset.py: {e}")


if __name__ == "__main__":
    main()

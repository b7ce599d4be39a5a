#!/usr/bin/env python3
"""Training speed of ELMER (each exit strategy) against the stock fairseq ``transformer``, as a user sees it.

    python scripts/train_speed.py --data runs/debsum/bin --json docs/benchmarks/train-speed-debsum.json
    python scripts/train_speed.py --data data-bin/sample --size tiny --updates 30 --interval 10 --skip 10

Every system is trained by ``fairseq-train`` on the same data at the same size, optimizer and
``--max-tokens`` as ``scripts/compare.py`` trains them (one after the other, nothing else should run),
for ``--updates`` updates, without validation or checkpoints. From fairseq's own per-interval log
(``ups``, ``wpb``) after the first ``--skip`` updates (start-up, first allocations): updates/s (total
updates over total time) and target tokens/s, and each against the AR's. Systems: ``ar``;
``elmer-lplm``, ``elmer-hard``, ``elmer-soft``, ``elmer-soft-glat``; a ``+bf16`` suffix adds
``--autocast-bf16`` (``+ad0``: ``--attention-dropout 0``, the AR's default; ``+d0``: ``--dropout 0``, the
harness's students; ``+ctc``: ``--ctc`` on compare.py's CTC canvas, 1.5x the data's) to an ELMER system.
``--env NAME=VALUE`` runs every system with that environment variable (e.g. ``THP_MEM_ALLOC_ENABLE=1``:
PyTorch's CPU allocator puts blocks of 2 MB and more on transparent huge pages, so vocabulary-sized
tensors fault in 2 MB at a time instead of 4 KB).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import AR_TRAIN, REPO, SIZES, base_train_flags, ctc_canvas_rule, elmer_train_flags, tool  # noqa: E402

STRATEGIES = {"elmer-lplm": ["--early-exit", "lplm"], "elmer-hard": ["--early-exit", "hard"],
              "elmer-soft": ["--early-exit", "soft"], "elmer-soft-glat": ["--early-exit", "soft", "--glat"]}
MODIFIERS = {"bf16": ["--autocast-bf16"], "ad0": ["--attention-dropout", "0"], "d0": ["--dropout", "0"],
             "ctc": ["--ctc"]}
DEFAULT = "ar,elmer-lplm,elmer-hard,elmer-soft,elmer-soft-glat,elmer-soft-glat+bf16"


def system_flags(name, canvas):
    """fairseq-train flags of ``name`` (ar, or an ELMER strategy with +modifiers)."""
    base, *mods = name.split("+")
    if base == "ar":
        if mods:
            raise SystemExit(f"--systems: {name}: modifiers apply to the ELMER systems only")
        return list(AR_TRAIN)
    if base not in STRATEGIES:
        raise SystemExit(f"--systems: unknown {base!r}; choose from ar, {', '.join(STRATEGIES)}")
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown:
        raise SystemExit(f"--systems: {name}: unknown modifier(s) {', '.join(unknown)}; choose from {', '.join(MODIFIERS)}")
    if "ctc" in mods:  # compare.py's --ctc systems: a canvas CTC_CANVAS_FACTOR times the data's
        canvas = ctc_canvas_rule(canvas)
    return elmer_train_flags(canvas) + STRATEGIES[base] + [f for m in mods for f in MODIFIERS[m]]


def read_canvas(data):
    """The canvas rule the data's prepare stage chose (compare.py's canvas.json or the recipes' canvas.env)."""
    path = os.path.join(data, "canvas.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    path = os.path.join(data, "canvas.env")
    if os.path.exists(path):
        with open(path) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        return {"canvas_len_a": float(env["CANVAS_A"]), "canvas_len_b": int(env["CANVAS_B"])}
    raise SystemExit(f"--data {data}: no canvas.json or canvas.env (run the prepare stage, or give --canvas-len-b)")


def intervals(log_lines):
    """(num_updates, ups, wpb) of every fairseq ``train_inner`` line."""
    out = []
    for line in log_lines:
        if "train_inner" not in line:
            continue
        found = {k: re.search(rf"\b{k}[ =]([\d.]+)", line) for k in ("num_updates", "ups", "wpb")}
        if all(found.values()):
            out.append((int(found["num_updates"].group(1)), float(found["ups"].group(1)), float(found["wpb"].group(1))))
    return out


def speed(rows, skip):
    """Updates/s and tokens/s over the intervals that start at or after ``skip`` updates: total updates
    (tokens) over total time, each interval's time being its updates over its ups."""
    updates, seconds, tokens, prev = 0, 0.0, 0.0, 0
    for num, ups, wpb in rows:
        n, prev_num = num - prev, prev
        prev = num
        if prev_num < skip or ups <= 0:
            continue
        updates, seconds, tokens = updates + n, seconds + n / ups, tokens + n * wpb
    if not updates:
        raise ValueError(f"no logged interval after the first {skip} updates: raise --updates or lower --skip")
    return {"updates_per_s": updates / seconds, "tokens_per_s": tokens / seconds, "timed_updates": updates,
            "timed_s": seconds}


def measure(args, name, canvas):
    cmd = [tool("fairseq-train"), args.data, *system_flags(name, canvas),
           *base_train_flags(args.size, args.max_tokens, args.updates), "--no-save", "--log-interval", str(args.interval),
           # --user-dir for every system: it also allow-lists fairseq's checkpoint types for torch.load
           *([] if name != "ar" else ["--user-dir", os.path.join(REPO, "elmer_fairseq")])]
    env = dict(os.environ, **dict(pair.split("=", 1) for pair in args.env))
    print(f"[train_speed] {name}: {args.updates} updates", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"train_speed: {name} failed (exit {proc.returncode}):\n" + proc.stderr[-3000:])
    result = speed(intervals((proc.stdout + proc.stderr).splitlines()), args.skip)
    result.update(system=name, wall_s=time.time() - t0, command=cmd)
    return result


def table(results):
    ar = next((r for r in results if r["system"] == "ar"), None)
    lines = ["| system | updates/s | target tokens/s | updates/s vs AR | tokens/s vs AR |", "|---|---|---|---|---|"]
    for r in results:
        rel = (f"{r['updates_per_s'] / ar['updates_per_s']:.2f}x", f"{r['tokens_per_s'] / ar['tokens_per_s']:.2f}x") if ar else ("—", "—")
        lines.append(f"| {r['system']} | {r['updates_per_s']:.3f} | {r['tokens_per_s']:.0f} | {rel[0]} | {rel[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="fairseq-preprocess folder (src -> tgt) with canvas.json or canvas.env")
    p.add_argument("--systems", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size of every system (compare.py's)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--updates", type=int, default=120, help="updates each system trains")
    p.add_argument("--interval", type=int, default=20, help="fairseq --log-interval: the timing granularity")
    p.add_argument("--skip", type=int, default=20, help="updates not timed at the start (start-up)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every system's fairseq-train (repeatable)")
    p.add_argument("--json", help="write every figure and command here")
    args = p.parse_args(argv)
    bad = [pair for pair in args.env if "=" not in pair or not pair.split("=", 1)[0]]
    if bad:
        p.error(f"--env {bad[0]!r}: expected NAME=VALUE")
    if args.skip >= args.updates:
        p.error(f"--skip {args.skip} must be below --updates {args.updates}")
    canvas = read_canvas(args.data)
    names = [n for n in args.systems.split(",") if n]
    for name in names:
        system_flags(name, canvas)  # refuse a bad name before any training
    results = [measure(args, name, canvas) for name in names]
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()

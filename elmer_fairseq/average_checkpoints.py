"""Checkpoint averaging: one fairseq checkpoint whose weights are the mean of several.

fairseq ships ``scripts/average_checkpoints.py`` in its source tree, not in the pip package, and NAT
papers (and fairseq's NAT examples) report averaged checkpoints. This is the same operation for any fairseq
checkpoint, AR or ELMER:

    elmer-average-checkpoints --inputs ckpt/checkpoint_2_1400.pt ... --output ckpt/avg.pt
    elmer-average-checkpoints --dir ckpt --last-updates 5 --output ckpt/avg.pt   # the 5 latest checkpoint_E_U.pt
    elmer-average-checkpoints --dir ckpt --last-epochs 5 --output ckpt/avg.pt    # the 5 latest checkpointE.pt

Floating-point tensors are averaged (accumulated in float64, written back in each tensor's own dtype);
every other entry (integer buffers, the configuration, the optimizer state, the training position) is
the last input's, so the output loads wherever the last input does. The inputs must hold exactly the
same parameter names and shapes; a mismatch is an error that names the file.
"""

import argparse
import logging
import os
import re
from typing import Dict, List, Sequence

import torch
from fairseq import checkpoint_utils

logger = logging.getLogger(__name__)

# what fairseq-train writes: checkpoint_<epoch>_<updates>.pt (--save-interval-updates), checkpoint<epoch>.pt
KINDS = {"updates": (re.compile(r"^checkpoint_\d+_(\d+)\.pt$"), "checkpoint_<epoch>_<updates>.pt",
                     "--save-interval-updates and --keep-interval-updates"),
         "epochs": (re.compile(r"^checkpoint(\d+)\.pt$"), "checkpoint<epoch>.pt", "--keep-last-epochs")}


def numbered_checkpoints(folder: str, kind: str = "updates") -> Dict[int, str]:
    """``{updates or epoch: path}`` for the interval (kind ``updates``) or epoch checkpoints in ``folder``."""
    pattern = KINDS[kind][0]
    found = {}
    for name in os.listdir(folder):
        m = pattern.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return found


def updates_of(path: str) -> int:
    """The number of updates a fairseq checkpoint was saved at (memory-mapped: the tensors are not read)."""
    return int(torch.load(path, map_location="cpu", mmap=True)["optimizer_history"][-1]["num_updates"])


def last_checkpoints(folder: str, n: int, kind: str = "updates", up_to: int = None,
                     at_most: bool = False) -> List[str]:
    """The ``n`` checkpoints of ``kind`` with the most updates (epochs), at most ``up_to``, oldest first;
    with ``at_most``, all of them when fewer than ``n`` exist (none: ``[]``) instead of an error.
    For ``updates``, ``checkpoint_last.pt`` counts at its own number of updates when no interval checkpoint
    has it: fairseq writes no ``checkpoint_E_U.pt`` when update U also ends an epoch."""
    found = numbered_checkpoints(folder, kind)
    last = os.path.join(folder, "checkpoint_last.pt")
    if kind == "updates" and (up_to is None or up_to not in found) and os.path.exists(last):  # else it adds nothing
        found.setdefault(updates_of(last), last)
    steps = sorted(u for u in found if up_to is None or u <= up_to)
    if len(steps) < n and not at_most:
        _, name, flags = KINDS[kind]
        limit = "" if up_to is None else f" at or before {up_to} {kind}"
        raise ValueError(f"{folder}: {len(steps)} {name} files{limit}, {n} needed to average "
                         f"(fairseq-train keeps them with {flags})")
    return [found[u] for u in steps[-n:]]


def average_states(paths: Sequence[str]) -> dict:
    """The last checkpoint's state with every floating-point model tensor replaced by the mean over ``paths``."""
    if not paths:
        raise ValueError("no checkpoints to average")
    sums, state, reference = {}, None, None
    for path in paths:
        # torch.load as saved (weights_only, fairseq's types allow-listed by importing elmer_fairseq), not
        # checkpoint_utils.load_checkpoint_to_cpu: its upgrades turn the config into an OmegaConf object,
        # which a weights_only load of the output would then refuse
        state = torch.load(path, map_location="cpu")
        model = state["model"]
        shapes = {k: tuple(v.shape) for k, v in model.items()}
        if reference is None:
            reference = (paths[0], shapes)
        elif shapes != reference[1]:
            missing = sorted(set(reference[1]) ^ set(shapes))
            differ = sorted(k for k in set(reference[1]) & set(shapes) if reference[1][k] != shapes[k])
            raise ValueError(f"{path}: its parameters differ from {reference[0]}'s "
                             f"(names in one only: {missing[:5]}; shapes differ: {differ[:5]})")
        for k, v in model.items():
            if torch.is_floating_point(v):
                sums[k] = sums[k] + v.double() if k in sums else v.double()
    model = state["model"]
    for k, total in sums.items():
        model[k] = (total / len(paths)).to(model[k].dtype)
    state["averaged_from"] = [os.path.abspath(p) for p in paths]
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description="Average the weights of fairseq checkpoints (AR or ELMER).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", help="checkpoint files to average")
    src.add_argument("--dir", help="a fairseq-train --save-dir with interval checkpoints (checkpoint_E_U.pt)")
    last = p.add_mutually_exclusive_group()
    last.add_argument("--last-updates", type=int, metavar="N",
                      help="with --dir: average the N interval checkpoints (checkpoint_E_U.pt) with the most updates "
                      "(the default, N = 5)")
    last.add_argument("--last-epochs", type=int, metavar="N", help="with --dir: average the N latest checkpointE.pt")
    p.add_argument("--up-to", type=int, metavar="U", help="with --dir: only checkpoints of at most U updates (epochs)")
    p.add_argument("--at-most", action="store_true",
                   help="with --dir: average all of them when fewer than N exist (said in the log); when none "
                   "exists, write no --output and exit 0 (the caller falls back to another checkpoint)")
    p.add_argument("--output", required=True, help="where the averaged checkpoint is written")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    kind, n = ("epochs", args.last_epochs) if args.last_epochs is not None else ("updates", args.last_updates or 5)
    if n < 1:
        p.error(f"--last-{kind} {n}: expected 1 or more")
    if args.at_most and not args.dir:
        p.error("--at-most: expected --dir (it caps how many of a folder's checkpoints are averaged)")
    try:
        paths = args.inputs or last_checkpoints(args.dir, n, kind, args.up_to, args.at_most)
        if not paths:
            logger.warning("--at-most: no %s in %s; nothing averaged, %s not written", KINDS[kind][1], args.dir,
                           args.output)
            return
        if len(paths) < n:
            logger.warning("--last-%s %d --at-most: %s holds %d %s; averaging those", kind, n, args.dir, len(paths),
                           KINDS[kind][1])
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"--inputs: {path} is not a file")
        state = average_states(paths)
    except ValueError as e:
        p.error(str(e))
    checkpoint_utils.torch_persistent_save(state, args.output)  # .tmp, then renamed
    logger.info("averaged %d checkpoints into %s: %s", len(paths), args.output, ", ".join(paths))


if __name__ == "__main__":
    main()

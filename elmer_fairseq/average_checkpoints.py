"""Checkpoint averaging: one fairseq checkpoint whose weights are the mean of several.

fairseq ships ``scripts/average_checkpoints.py`` in its source tree, not in the pip package, and NAT
papers (and fairseq's NAT examples) report averaged checkpoints. This is the same operation for any fairseq
checkpoint, AR or ELMER:

    elmer-average-checkpoints --inputs ckpt/checkpoint_2_1400.pt ... --output ckpt/avg.pt
    elmer-average-checkpoints --dir ckpt --last-updates 5 --output ckpt/avg.pt   # the 5 latest checkpoint_E_U.pt

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

INTERVAL = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")


def interval_checkpoints(folder: str) -> Dict[int, str]:
    """``{updates: path}`` for the ``checkpoint_<epoch>_<updates>.pt`` files that
    ``--save-interval-updates`` writes in ``folder``."""
    found = {}
    for name in os.listdir(folder):
        m = INTERVAL.match(name)
        if m:
            found[int(m.group(2))] = os.path.join(folder, name)
    return found


def last_interval_checkpoints(folder: str, n: int, up_to: int = None) -> List[str]:
    """The ``n`` interval checkpoints with the most updates (at most ``up_to``), oldest first."""
    found = interval_checkpoints(folder)
    updates = sorted(u for u in found if up_to is None or u <= up_to)
    if len(updates) < n:
        limit = "" if up_to is None else f" at or before {up_to} updates"
        raise ValueError(f"{folder}: {len(updates)} checkpoint_<epoch>_<updates>.pt files{limit}, "
                         f"{n} needed to average (train with --save-interval-updates and --keep-interval-updates -1)")
    return [found[u] for u in updates[-n:]]


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
    p.add_argument("--last-updates", type=int, default=5, metavar="N",
                   help="with --dir: average the N interval checkpoints with the most updates")
    p.add_argument("--up-to", type=int, metavar="U", help="with --dir: only checkpoints of at most U updates")
    p.add_argument("--output", required=True, help="where the averaged checkpoint is written")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    if args.last_updates < 1:
        p.error(f"--last-updates {args.last_updates}: expected 1 or more")
    try:
        paths = args.inputs or last_interval_checkpoints(args.dir, args.last_updates, args.up_to)
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

"""--tensorboard-logdir: a 10-update hard-exit run's event files hold loss, nll_loss and the per-layer
exit fractions, with the values the text log prints (read back with tensorboard's own event reader)."""

import re

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import TRAIN_FLAGS, ok, run


def test_tensorboard_events_hold_losses_and_exit_fractions(data_bin, tmp_path):
    _, dest = data_bin
    logdir = tmp_path / "tb"
    out = ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + [
        "--early-exit", "hard", "--model-exit-threshold", "2.0", "--max-update", "10",
        "--save-dir", str(tmp_path / "c"), "--tensorboard-logdir", str(logdir), "--disable-validation"]))
    # the text log of update 10 (log interval 1): "loss=..., nll_loss=..., exit_frac_l1=..., ..."
    line = [ln for ln in out.splitlines() if "train_inner" in ln and "num_updates=10," in ln]
    assert len(line) == 1, out[-3000:]
    printed = {k: float(v) for k, v in re.findall(r"(\w+)=([-0-9.e]+)", line[0])}
    events = EventAccumulator(str(logdir / "train_inner"))
    events.Reload()
    tags = events.Tags()["scalars"]
    layers = sorted(int(t[len("exit_frac_l"):]) for t in tags if t.startswith("exit_frac_l"))
    assert layers == [1, 2, 3], tags  # TRAIN_FLAGS: --decoder-layers 3
    for tag in ["loss", "nll_loss", "exit_layer"] + [f"exit_frac_l{layer}" for layer in layers]:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(1, 11)), tag
        assert abs(scalars[-1].value - printed[tag]) <= 0.0051, (tag, scalars[-1].value, printed[tag])
    fractions = [events.Scalars(f"exit_frac_l{layer}")[-1].value for layer in layers]
    assert abs(sum(fractions) - 1.0) < 0.01
    # the mean exit layer is the fractions' mean
    mean = sum(layer * f for layer, f in zip(layers, fractions))
    assert abs(mean - events.Scalars("exit_layer")[-1].value) < 0.02

"""Test helper: run fairseq-train with the given arguments, saving this rank's weights after
every update to OUT/rank<R>.pt, so a test can compare what each process holds.

    python tests/dist_worker.py OUT fairseq-train-args...
"""

import sys

import fairseq_cli.train as fairseq_train
import torch
from fairseq.trainer import Trainer

OUT = sys.argv[1]


class RecordingTrainer(Trainer):
    def train_step(self, samples, raise_oom=False):
        result = super().train_step(samples, raise_oom)
        weights = {k.replace("module.", "", 1): v.detach().clone() for k, v in self.model.state_dict().items()}
        torch.save(weights, f"{OUT}/rank{self.data_parallel_rank}.pt")
        return result


fairseq_train.Trainer = RecordingTrainer
sys.argv = ["fairseq-train"] + sys.argv[2:]
fairseq_train.cli_main()

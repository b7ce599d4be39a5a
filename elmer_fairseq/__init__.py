"""ELMER for fairseq: importing this package (or ``--user-dir elmer_fairseq``) registers
the ``elmer_nat`` model, the ``lplm`` criterion and the ``nat_early_exit`` and
``elmer_denoising`` (pre-training) tasks, and installs the fairseq/torch workarounds listed in
``fairseq_compat`` (checkpoints load with ``weights_only=True``; checkpoint copies are atomic)."""

from . import fairseq_compat

fairseq_compat.install()

from . import elmer_denoising_task, elmer_nat_model, lplm_criterion, nat_early_exit_task  # noqa: E402,F401
from .hub_interface import ELMER  # noqa: E402,F401

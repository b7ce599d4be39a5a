"""ELMER for fairseq: importing this package (or ``--user-dir elmer_fairseq``) registers
the ``elmer_nat`` model, the ``lplm`` criterion and the ``nat_early_exit`` and
``elmer_denoising`` (pre-training) tasks."""

from . import atomic_checkpoint_copy
from .safe_checkpoint import register_safe_globals

register_safe_globals()
atomic_checkpoint_copy.install()

from . import elmer_denoising_task, elmer_nat_model, lplm_criterion, nat_early_exit_task  # noqa: E402,F401
from .hub_interface import ELMER  # noqa: E402,F401

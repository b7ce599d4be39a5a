"""Range checks of the plugin's options, declared once in each dataclass field's metadata.

A field carries ``metadata={"help": ..., "check": at_least(1)}``. The check runs twice:

- at parse time (``add_checked_args``, called from the model's, criterion's and task's ``add_args``):
  a bad command-line value is one argparse line and exit status 2, e.g.
  ``fairseq-train: error: argument --lplm-samples: must be >= 1, got 0``;
- at build time (``check_fields``), for configurations that never went through argparse (a checkpoint's,
  the hub's, a test's): ``ValueError("--lplm-samples must be >= 1, got 0")``.

Checks that involve two options (e.g. the canvas length rule) stay with the component that owns them.
Flags of fairseq's other models that a component cannot honour are refused at parse time
(``add_refused_args``), never ignored.
"""

import argparse
from dataclasses import fields

from fairseq.dataclass.utils import gen_parser_from_dataclass


def at_least(low):
    def check(value):
        return None if value >= low else f"must be >= {low}, got {value}"

    return check


def within(low, high, high_open=False):
    """``low <= value <= high`` (``< high`` with ``high_open``)."""

    def check(value):
        if low <= value and (value < high if high_open else value <= high):
            return None
        return f"must lie in [{low}, {high}{')' if high_open else ']'}, got {value}"

    return check


def _flag(name):
    return "--" + name.replace("_", "-")


def _checked_type(convert, check):
    def parse(text):
        value = convert(text)
        if value is not None:
            problem = check(value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its own errors
    return parse


def add_checked_args(parser, dataclass_type, delete_default=False):
    """fairseq's ``gen_parser_from_dataclass`` plus the fields' checks on each parsed value."""
    gen_parser_from_dataclass(parser, dataclass_type(), delete_default=delete_default)
    checks = {f.name: f.metadata["check"] for f in fields(dataclass_type) if "check" in f.metadata}
    for action in parser._actions:  # an argument group shares its parser's action list
        if action.dest in checks and action.type is not None and not getattr(action.type, "elmer_checked", False):
            action.type = _checked_type(action.type, checks[action.dest])
            action.type.elmer_checked = True


class _Refused(argparse.Action):
    """A flag that the component cannot honour: giving it (with or without a value) is an argparse error."""

    def __init__(self, option_strings, dest, reason=None, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=f"refused: {reason}")
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {self.reason}")


def add_refused_args(parser, refused):
    """``refused``: {flag: reason}; the flags show in --help as refused and fail at parse time."""
    for flag, reason in refused.items():
        parser.add_argument(flag, action=_Refused, reason=reason)


def check_fields(cfg, dataclass_type):
    """Raise ``ValueError`` naming the flag for the first field of ``cfg`` that fails its check."""
    for f in fields(dataclass_type):
        if "check" not in f.metadata:
            continue
        value = getattr(cfg, f.name, None)
        if value is None:
            continue
        problem = f.metadata["check"](value)
        if problem:
            raise ValueError(f"{_flag(f.name)} {problem}")

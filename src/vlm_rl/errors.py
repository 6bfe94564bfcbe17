"""The errors vlm_rl expects, and the one wrapper every entry point runs in.

An expected error is bad input the user can fix: a data row, a config value or flag, a missing file
or folder, an unknown model or environment, a hub failure. Each is a `VlmRlError` whose message
names the place (file, row, field or flag) and the fix, on one line. `run_entry_point` (used by
`vlm-rl` and by every recipe) prints that line on stderr and exits with code 2, without a
traceback; `--debug` or VLM_RL_DEBUG=1 shows the traceback as well. Any other exception is a bug
and keeps its traceback. Under a launcher with several processes only the main one prints.

The classes also derive from the built-in exception they refine (`ConfigError` is a ValueError,
`MissingPathError` a FileNotFoundError, ...), so callers that catch those keep working.

This module imports nothing heavy: the command line loads it before torch.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "DataError",
    "MissingPathError",
    "ModelNotFoundError",
    "VlmRlError",
    "check_ranges",
    "closest",
    "is_main_process",
    "one_line",
    "run_entry_point",
]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "VLM_RL_DEBUG"
EXIT_CODE = 2


class VlmRlError(Exception):
    """An expected error: the message names the input (file, row, field or flag) and the fix."""


class ConfigError(VlmRlError, ValueError):
    """A bad flag or config value, or an inconsistent combination of them."""


class DataError(VlmRlError, ValueError):
    """Bad input data: the message names where (dataset, row, field), what is wrong, and the fix."""


class MissingPathError(VlmRlError, FileNotFoundError):
    """A file or folder that is not there (or not what it should be)."""


class ModelNotFoundError(VlmRlError, OSError):
    """A model id or folder that cannot be loaded."""


def one_line(message: str) -> str:
    """`message` with its line breaks (and the indentation after them) turned into single spaces.

    >>> one_line("model not found.\\n    train it:\\n  vlm-rl train-reward-model")
    'model not found. train it: vlm-rl train-reward-model'
    """
    return re.sub(r"\s*\n\s*", " ", message.strip())


def is_main_process() -> bool:
    """True on the process that should print: rank 0 of a launched group, or a lone process.

    Read from the launchers' environment (torchrun/accelerate's RANK, MPI's), so it also works
    before (or without) any accelerate state."""
    for variable in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(variable, "0") not in ("", "0"):
            return False
    return True


def run_entry_point(main: Callable[[list[str]], Any], argv: list[str] | None, prog: str) -> int:
    """Run `main(argv)` and return the process's exit code: 0, or 2 after an expected error.

    `--debug` (removed from `argv` before `main` sees it) or VLM_RL_DEBUG=1 prints the traceback
    of an expected error too. Unexpected exceptions propagate with their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except VlmRlError as error:
        if is_main_process():
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr, flush=True)
        return EXIT_CODE
    return 0


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest of `choices`, or ''.

    >>> closest("totl_steps", ["total_steps", "seed"])
    " (did you mean 'total_steps'?)"
    """
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+|-inf)\s*,\s*(-?[\d.e+-]+|inf)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")


def _within(value: float, rule: str) -> bool:
    if match := _INTERVAL.match(rule):
        opening, low, high, closing = match.groups()
        low_value, high_value = float(low), float(high)
        above = value >= low_value if opening == "[" else value > low_value
        below = value <= high_value if closing == "]" else value < high_value
        return above and below
    match = _BOUND.match(rule)
    if match is None:
        raise ValueError(f"bad range rule {rule!r}")
    operator, bound = match.group(1), float(match.group(2))
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[operator]


def check_ranges(config: Any, rules: Mapping[str, str], *, hint: str = "") -> None:
    """Raise `ConfigError` naming the flag of the first field of `config` outside its rule.

    `rules` maps a field name to ">= 1", "> 0", "[0, 1]", "(0, 1]" or "finite". A field's
    annotation says whether it must be an int or a float; None passes when the annotation allows
    it; a list field has every element checked.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     lr: float = -1.0
    >>> check_ranges(C(), {"lr": "> 0"})
    Traceback (most recent call last):
    ...
    vlm_rl.errors.ConfigError: --lr -1.0: must be > 0
    """
    annotations = {}
    for klass in reversed(type(config).__mro__):
        annotations.update(getattr(klass, "__annotations__", {}))
    for name, rule in rules.items():
        value = getattr(config, name)
        annotation = str(annotations.get(name, ""))
        if value is None:
            if "None" in annotation:
                continue
            raise ConfigError(f"--{name}: a value is required (must be {rule}){hint}")
        values = value if isinstance(value, list | tuple) else [value]
        wants_int = re.match(r"(list\[)?int\b", annotation) is not None
        for item in values:
            if isinstance(item, bool) or not isinstance(item, numbers.Real):
                kind = "an integer" if wants_int else "a number"
                raise ConfigError(f"--{name} {item!r}: must be {kind}, got {type(item).__name__}{hint}")
            if wants_int and not isinstance(item, numbers.Integral):
                raise ConfigError(f"--{name} {item!r}: must be an integer{hint}")
            if not math.isfinite(item):
                raise ConfigError(f"--{name} {item!r}: must be a finite number{hint}")
            if rule != "finite" and not _within(item, rule):
                wanted = f"in {rule}" if _INTERVAL.match(rule) else rule
                raise ConfigError(f"--{name} {item!r}: must be {wanted}{hint}")

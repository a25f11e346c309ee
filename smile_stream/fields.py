"""Typed reads of the fields of the user's files: recipes, configs, adapter configs, journals, indexes.

A field takes only its own JSON/TOML type: the string "false" is not a boolean, 2.7 and true are
not integers. Anything else is a SmileError naming the file, the field, the value and the type
expected, never a silent conversion (Python's `bool("false")` is True) and never an internal error.
"""

from __future__ import annotations

import math
import re
from re import _parser as sre_parse  # the stdlib's own pattern parser: to look for catastrophic backtracking
from typing import Any

from .errors import SmileError

_MISSING = object()
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", sre_parse.MAX_REPEAT)}
MAX_PATTERN_LENGTH = 1000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KINDS: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: isinstance(v, bool), "a boolean (true or false, without quotes)"),
    "int": (_is_int, "an integer"),
    "number": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "a table/object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}


def type_name(value: Any) -> str:
    """The JSON/TOML name of a value's type, as a user sees it in the file."""
    if value is None:
        return "null"
    for name, python in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("list", list)):
        if isinstance(value, python):
            return name
    return "table/object" if isinstance(value, dict) else type(value).__name__


def check(value: Any, kinds: str, where: str) -> Any:
    """`value` if it is of one of `kinds` ("int", "int|str", ...; "null" allows None), else a SmileError."""
    names = kinds.split("|")
    if value is None and "null" in names:
        return value
    if any(KINDS[name][0](value) for name in names if name != "null"):
        return value
    wanted = " or ".join(KINDS[name][1] if name != "null" else "null" for name in names)
    raise SmileError(f"{where} is {value!r} (a {type_name(value)}), but it must be {wanted}. Fix that value.")


def get(data: dict, key: str, kinds: str, where: str, default: Any = _MISSING) -> Any:
    """`data[key]` checked against `kinds`; `default` when absent (required when no default is given)."""
    if key not in data:
        if default is _MISSING:
            raise SmileError(f"{where}: the field {key!r} is missing. Fix or re-create the file.")
        return default
    return check(data[key], kinds, f"{where}: {key}")


def safe_regex(pattern: str, where: str) -> str:
    """A regex from an untrusted file, refused if it could backtrack catastrophically.

    Python's `re` has no timeout, so patterns are screened instead: an unbounded repeat inside
    another unbounded repeat, or an alternation inside one (`(a+)+`, `(a|aa)*`), is what makes
    matching exponential; plain patterns such as `.*q_proj` or `layers\\.(1|2)\\.mlp` pass.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise SmileError(f"{where}: {pattern!r} is not a valid regular expression ({exc}). Fix it.") from None
    if len(pattern) > MAX_PATTERN_LENGTH or _nested_repeat(sre_parse.parse(compiled.pattern), False):
        raise SmileError(
            f"{where}: the pattern {pattern[:80]!r} nests repeats (such as (a+)+ or (a|b)*) or is very long; matching it "
            "could take exponential time, so smile-stream refuses it. Write module names or simpler patterns."
        )
    return pattern


def _nested_repeat(parsed: Any, in_unbounded: bool) -> bool:
    for op, arg in parsed:
        if op in _REPEATS:
            low, high, sub = arg
            unbounded = high == sre_parse.MAXREPEAT or high > 64
            if in_unbounded and unbounded:
                return True
            if _nested_repeat(sub, in_unbounded or unbounded):
                return True
        elif op is sre_parse.BRANCH:
            if in_unbounded or any(_nested_repeat(branch, in_unbounded) for branch in arg[1]):
                return True
        elif op is sre_parse.SUBPATTERN:
            if _nested_repeat(arg[-1], in_unbounded):
                return True
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            if _nested_repeat(arg[1], in_unbounded):
                return True
    return False

"""YAML as people write numbers: plain scalars read the way Python's int() and float() read them.

    yaml.load(text, Loader=yaml_loader())   # 1e-6 -> 1e-06, 1_000 -> 1000, 010 -> 10, 0x10 text
    read_number("config.optim.lr", "4e-4", float)   # -> 0.0004 (a number written as a string)

The config loader uses both, for files and ``--set`` values alike.
"""

from __future__ import annotations

import functools
import math
import re
from decimal import Decimal

_DIGITS = r"[0-9]+(?:_[0-9]+)*"  # Python's digit groups: 1_000, never 1__0 or _1
_INT_RE = re.compile(rf"^[-+]?{_DIGITS}$")
_FLOAT_RE = re.compile(
    rf"^[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?{_DIGITS})?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"  # YAML's own spellings of inf and nan
)


@functools.cache
def yaml_loader():
    """yaml.SafeLoader whose plain-scalar numbers are those of Python's int() and float().

    YAML 1.1 reads ``1e-6`` as text (its exponent needs a dot), ``010`` as eight and ``1:30`` as
    ninety; here the first is a float, the second ten and the third text.
    """
    import yaml

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(int_tag, _INT_RE, list("-+0123456789"))
    Loader.add_implicit_resolver(float_tag, _FLOAT_RE, list("-+.0123456789"))

    def construct_int(loader, node):
        text = loader.construct_scalar(node)
        try:
            return int(text)
        except ValueError:  # an explicit !!int in YAML's notation (0x10, 1:30)
            return yaml.SafeLoader.construct_yaml_int(loader, node)

    Loader.add_constructor(int_tag, construct_int)
    return Loader


def read_number(where: str, value, tp: type) -> int | float:
    """``value`` as an int or a float: a number, or a string that Python's float() reads.

    An int key takes a float only when it is a whole number (``1e3`` -> 1000; a string is
    checked exactly with Decimal, so ``1.00000000000000001`` is not taken for 1). A bool is never
    a number. Non-finite floats pass here and are rejected by validate(), which names the rule.
    """
    wrong = ValueError(f"{where} must be {tp.__name__}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise wrong
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise wrong from None
        if tp is float:
            return number
        exact = Decimal(value)  # reads every spelling float() reads, without rounding
        if not (math.isfinite(number) and exact == exact.to_integral_value()):
            raise wrong
        return int(exact)
    if tp is float:
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"{where} must be a finite number, got {value}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise wrong
        return int(value)
    return value

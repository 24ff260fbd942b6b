"""Errors a user can act on, and the range checks that raise them."""

from __future__ import annotations

import math
import numbers


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")

    def __reduce__(self) -> tuple[type, tuple[str, object, str]]:
        # Rebuilt from its three parts: a ConfigError raised in a Ray task reaches the driver as itself.
        return (type(self), (self.field, self.value, self.fix))


def _number(bound: float) -> str:
    """A bound as a person writes it: 1 rather than 1.0, 0.5 as it is."""
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = f"[{_number(ge)}" if ge is not None else f"({_number(gt)}" if gt is not None else None
    high = f"{_number(le)}]" if le is not None else f"{_number(lt)})" if lt is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {_number(ge)}" if ge is not None else f"> {_number(gt)}"
    if high:
        return f"<= {_number(le)}" if le is not None else f"< {_number(lt)}"
    return ""


def check_range(
    field: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    optional: bool = False,
    hint: str = "",
) -> None:
    """Raise a ConfigError naming `field` unless `value` is a finite real number within the bounds.

    NaN and infinities are always refused: a NaN compares false with every bound, so a check written as
    `if value < 0: raise` lets it through, and no setting of this project means anything at infinity.
    `optional` lets None through (a field whose None means "unset"). `hint` is appended to the fix.
    """
    if value is None and optional:
        return
    bounds = _bounds(ge, gt, le, lt)
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(field, value, f"must be a finite number {bounds}".rstrip() + suffix)
    number = float(value)
    too_low = (ge is not None and number < ge) or (gt is not None and number <= gt)
    too_high = (le is not None and number > le) or (lt is not None and number >= lt)
    if too_low or too_high:
        raise ConfigError(field, value, f"must be {bounds}{suffix}")


def check_ranges(config: object, names: tuple[str, ...] | list[str], **bounds: object) -> None:
    """:func:`check_range` with the same bounds on several fields of `config`, each named in its error."""
    for name in names:
        check_range(name, getattr(config, name), **bounds)  # type: ignore[arg-type]


def check_seed(field: str, value: object) -> None:
    """A random seed: an integer in [0, 2**63), which numpy's, torch's and vLLM's generators all accept."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**63:
        raise ConfigError(field, value, "must be an integer in [0, 2**63)")

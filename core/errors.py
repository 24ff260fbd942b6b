"""Errors a user can act on."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field}={value!r}: {fix}")

"""Typed errors with messages a user can act on.

Every error spectr raises on bad input is a `SpectrError`; the ones about an
invalid argument are also `ValueError`s, so callers that only know the
standard library can still catch them.
"""


class SpectrError(Exception):
    """Base class of every error spectr raises on purpose."""


class InvalidInputError(SpectrError, ValueError):
    """An argument is malformed: wrong shape, out of range, not a distribution."""

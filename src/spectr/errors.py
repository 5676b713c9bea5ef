"""Typed errors with messages a user can act on.

Every error spectr raises on bad input is a `SpectrError`; the ones about an
invalid argument are also `ValueError`s, so callers that only know the
standard library can still catch them.
"""


class SpectrError(Exception):
    """Base class of every error spectr raises on purpose."""


class InvalidInputError(SpectrError, ValueError):
    """An argument is malformed: wrong shape, out of range, not a distribution."""


class ModelNotFoundError(SpectrError, FileNotFoundError):
    """A model file or folder is missing, or the default model is not installed."""


class UnsupportedModelError(SpectrError, ValueError):
    """The model's architecture or settings are outside what a backend implements."""


class TokenizerMismatchError(SpectrError, ValueError):
    """Target and draft do not share one tokenizer, so draft tokens mean nothing to the target."""


class ContextOverflowError(SpectrError, ValueError):
    """More tokens than the model's context or the KV cache's capacity."""

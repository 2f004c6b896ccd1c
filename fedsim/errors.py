"""Exceptions users see: each names what went wrong and how to fix it."""


class FedsimError(Exception):
    """Base class for every error fedsim raises on purpose."""


class ConfigError(FedsimError, ValueError):
    """An invalid scenario field; the message starts with the dotted field name."""


class DataUnavailableError(FedsimError):
    """A dataset or pretrained weights could not be found or downloaded."""

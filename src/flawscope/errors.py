"""User-facing errors.

Every error a user can cause by bad input derives from :class:`FlawscopeError`; its message
names the file or field and says what is wrong. The CLI prints it as one line on stderr.
"""

from __future__ import annotations


class FlawscopeError(Exception):
    """Bad input or state that the user can fix; the message is shown as is."""


class ImageReadError(FlawscopeError):
    """An image file cannot be read (missing, empty, truncated, not an image)."""


class DatasetError(FlawscopeError):
    """A dataset folder is empty, has an unknown layout, or is inconsistent."""


class ModelFileError(FlawscopeError):
    """A model file is missing, corrupt, foreign, or of an unsupported version."""


class ConfigError(FlawscopeError):
    """An option or configuration value is invalid."""

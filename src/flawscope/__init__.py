"""flawscope: visual inspection from good parts.

Learn what normal parts look like, score new images, give calibrated OK/defect verdicts,
show where the defect is, and (with labelled data) classify object + state.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flawscope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from flawscope.errors import FlawscopeError  # noqa: E402

__all__ = ["FlawscopeError", "__version__"]

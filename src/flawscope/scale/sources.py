"""What ``flawscope predict --engine ray`` scores: SOURCE items resolved to one list of images.

An item is

* a folder: its image files, recursively, sorted (the same files as plain ``predict``);
* a glob (``*``, ``?``, ``[``; ``**`` crosses folders for local paths): the files it matches;
* an image file;
* a list file (any other file, e.g. ``images.txt``): one image per line, ``#`` comments and
  blank lines skipped; relative lines are relative to the list file's folder. Lines are taken
  as they are (not checked here): one that cannot be read becomes an error row;
* any of the above as a URI that ``pyarrow.fs.FileSystem.from_uri`` opens (``s3://``,
  ``gs://``, ``hdfs://``, ``file://``...). For URIs a glob's ``*`` also matches ``/``.

Local images are named by absolute, normalised path (``os.path.abspath``), remote ones by
their full URI: the names are the ``path`` column of the results and the key that resume
uses. One run reads one filesystem.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from flawscope.data.images import IMAGE_SUFFIXES, expand_images, is_image_file
from flawscope.errors import ConfigError

GLOB_CHARS = frozenset("*?[")


@dataclass
class ImageList:
    """Images to score: ``names`` as shown in the results; ``filesystem`` (a pyarrow
    filesystem, None for local files) opens ``name[len(prefix):]``."""

    names: list[str] = field(default_factory=list)
    filesystem: Any = None
    prefix: str = ""

    def fs_path(self, name: str) -> str:
        return name[len(self.prefix):]

    def __len__(self) -> int:
        return len(self.names)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(item: str) -> bool:
    """``scheme://...``."""
    return bool(_URI.match(item))


def _has_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)


def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return posixpath.splitext(base)[1].lower() in IMAGE_SUFFIXES and not base.startswith(".")


def resolve_sources(items: list[str]) -> ImageList:
    """The images of ``items`` (see the module docstring), duplicates dropped, order kept."""
    if not items:
        raise ConfigError("no SOURCE given: a folder, glob, list file or URI")
    out = ImageList()
    fs_key: str | None = None
    for item in items:
        if item.startswith("file://"):
            item = unquote(item[len("file://"):])
        names, fs, prefix = _resolve_uri(item) if is_uri(item) else _resolve_local(item)
        key = prefix if fs is not None else ""
        if fs_key is None:
            fs_key, out.filesystem, out.prefix = key, fs, prefix
        elif key != fs_key:
            raise ConfigError(f"{item}: on another filesystem than {items[0]}; one run reads "
                              "one filesystem (score the others in another run)")
        out.names += names
    out.names = list(dict.fromkeys(out.names))
    if not out.names:
        raise ConfigError(f"{' '.join(items)}: no images found")
    return out


# ---------------------------------------------------------------------------- local files
def _resolve_local(item: str) -> tuple[list[str], None, str]:
    path = Path(item)
    if _has_glob(item) and not path.exists():
        found = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not found:
            raise ConfigError(f"{item}: no files match")
        return [os.path.abspath(p) for p in found], None, ""
    if path.is_dir():
        return [os.path.abspath(p) for p in expand_images([path])], None, ""
    if not path.exists():
        raise ConfigError(f"{item}: no such file or folder")
    if is_image_file(path):
        return [os.path.abspath(path)], None, ""
    return _read_list_local(path), None, ""


def _read_list_local(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable list of images ({exc})") from None
    names = []
    for n, line in _entries(text):
        if is_uri(line):
            raise ConfigError(f"{path}, line {n}: {line} is a URI in a list of local files; "
                              "one run reads one filesystem")
        names.append(os.path.abspath(path.parent / line))  # absolute lines stay as they are
    return names


def _entries(text: str) -> list[tuple[int, str]]:
    """``(line number, entry)`` of a list file: stripped, no blanks or ``#`` comments."""
    return [(n, s) for n, raw in enumerate(text.splitlines(), 1)
            if (s := raw.strip()) and not s.startswith("#")]


# ---------------------------------------------------------------------------- URIs
def _open_uri(uri: str) -> tuple[Any, str, str]:
    """``(filesystem, path on it, prefix that makes names)`` of a remote URI."""
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # unknown scheme, missing credentials, bad bucket name
        raise ConfigError(f"{uri}: cannot open this URI ({exc})") from None
    trimmed, path = uri.rstrip("/"), path.rstrip("/")
    if not trimmed.endswith(path):
        raise ConfigError(f"{uri}: cannot tell the filesystem part of this URI from its path "
                          f"({path})")
    return filesystem, path, trimmed[: len(trimmed) - len(path)]


def _resolve_uri(uri: str) -> tuple[list[str], Any, str]:
    from pyarrow import fs as pafs

    pattern = uri if _has_glob(uri) else None
    base_uri = uri
    if pattern is not None:  # list from the last folder before the first wildcard
        head = uri[: min(uri.index(c) for c in GLOB_CHARS if c in uri)]
        base_uri = head[: head.rfind("/")]
    filesystem, base, prefix = _open_uri(base_uri)
    try:
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"{base_uri}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted(i.path for i in listing if i.type == pafs.FileType.File)
        else:
            files = [base]
    except ConfigError:
        raise
    except Exception as exc:  # permissions, network
        raise ConfigError(f"{base_uri}: cannot be listed ({exc})") from None
    if pattern is not None:
        names = [prefix + f for f in files if fnmatch.fnmatchcase(prefix + f, pattern)]
        if not names:
            raise ConfigError(f"{uri}: no files match")
        return names, filesystem, prefix
    if info.type == pafs.FileType.Directory:
        names = [prefix + f for f in files if _is_image_name(f)]
        if not names:
            raise ConfigError(f"{uri}: folder contains no image files")
        return names, filesystem, prefix
    if _is_image_name(base):
        return [prefix + base], filesystem, prefix
    return _read_list_uri(filesystem, base, prefix, uri), filesystem, prefix


def _read_list_uri(filesystem: Any, path: str, prefix: str, uri: str) -> list[str]:
    try:
        with filesystem.open_input_stream(path) as fh:
            text = fh.read().decode("utf-8")
    except Exception as exc:
        raise ConfigError(f"{uri}: not a readable list of images ({exc})") from None
    folder = posixpath.dirname(path)
    names = []
    for n, line in _entries(text):
        if is_uri(line):
            if not line.startswith(prefix):
                raise ConfigError(f"{uri}, line {n}: {line} is on another filesystem; one run "
                                  "reads one filesystem")
            names.append(line)
        else:
            names.append(prefix + (line if line.startswith("/") else
                                   posixpath.join(folder, line)))
    return names

"""Parsing the gin configs of a command (``--gin_file``, ``--gin_param``), with errors a user can act on.

``include`` lines inside configs resolve against the repository first, so a config can be run from anywhere.
A missing file, an unknown configurable or parameter, or a malformed value is a :class:`ctr.errors.ConfigError`
naming the file or binding (gin's own message, as one line).
"""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 calls importlib.util on a missing file without importing it)
import os
from typing import Sequence

import gin

from ctr import errors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(
    gin_files: Sequence[str], gin_params: Sequence[str], skip_unknown: bool = False, base_dir: str = ""
) -> None:
    """Parses ``gin_files`` (relative ones taken from ``base_dir``, default the current directory) then
    ``gin_params`` (not finalized).

    Raises:
      errors.ConfigError: a missing file (``--gin_file=...``), or gin's parse error (unknown configurable or
        parameter, malformed value), naming the file and line or the binding.
    """
    search_repo_first()
    paths = [os.path.join(base_dir, os.path.expanduser(f)) for f in gin_files]
    for f, path in zip(gin_files, paths):
        if not os.path.isfile(path):
            raise errors.ConfigError(f"--gin_file={f}: no such file ({os.path.abspath(path)})")
    try:
        gin.parse_config_files_and_bindings(paths, list(gin_params), finalize_config=False, skip_unknown=skip_unknown)
    except TypeError as e:  # gin 0.5.0's Python-path lookup of an include it did not find
        raise errors.ConfigError(f"included file not found: {errors.one_line(e).split('; ', 1)[-1]}") from e
    except (ValueError, SyntaxError, OSError) as e:
        raise errors.ConfigError(errors.one_line(e)) from e


def search_repo_first() -> None:
    """Resolves ``include`` lines against the repository before the current directory.

    gin 0.5.0 tries the current directory first, and its Python-path reader then crashes (TypeError) on any
    include whose folder is a namespace package, e.g. ``configs/base`` when run outside the repository. Putting
    the repository first makes ``include 'configs/...'`` work from any directory.
    """
    prefixes = gin.config._LOCATION_PREFIXES  # no public API orders the search path
    if REPO_ROOT not in prefixes:
        prefixes.insert(0, REPO_ROOT)

"""Input paths, directories and globs -> the files they name, each file once.

* "{stdlib}" is the Python standard library (`sysconfig.get_paths()["stdlib"]`); "~" is
  expanded. A directory stands for every file below it (DIR/**/*).
* In a pattern, `**` matches any number of directories and `*`, `?`, `[...]` match within
  one name (fnmatch); a name starting with "." is matched only by a pattern part that
  starts with "." (as glob does: DIR/**/* leaves .git out).
* Directory symbolic links below the fixed part of a pattern are not followed, as os.walk
  does by default. Followed, `ln -s . loop` lists every file again under loop/,
  loop/loop/, ... until the kernel's ELOOP (40 times), and two such links 2^40 times; the
  copies sit at different relative paths, which the split hashes, so one file would land
  in both training and validation. A link named in the fixed part (`--input linked_dir`)
  is followed: the user asked for it.
* A file is read once however many paths reach it (a file link to a listed file, two
  overlapping globs, `c/x.py` and `./c/x.py`): of the paths with one os.path.realpath,
  a path that is not itself a link is kept before one that is, then the first in sorted
  order, so the choice (and with it the split) does not depend on the order of inputs.
* Paths through a site-packages directory are left out (the default corpus is the
  standard library without installed packages).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import sysconfig

from jaxtrain.config.errors import DataError

_WILDCARD = re.compile(r"[*?[]")


@dataclasses.dataclass(frozen=True)
class InputFiles:
    files: list[tuple[str, str]]  # (root, path) sorted by path; the split hashes the path relative to root
    directory_links: int  # directory links met below a pattern's fixed part, not followed
    duplicates: int  # paths left out because their file was already listed

    def skipped(self) -> dict[str, int]:
        return {"directory_links": self.directory_links, "duplicate_paths": self.duplicates}


def describe_skipped(skipped: dict[str, int]) -> str:
    """What `InputFiles.skipped` left out, in words ("" when nothing)."""
    links, duplicates = skipped.get("directory_links", 0), skipped.get("duplicate_paths", 0)
    words = [f"{links} directory link{'s' * (links != 1)} not followed" if links else "",
             f"{duplicates} path{'s' * (duplicates != 1)} to a file already listed" if duplicates else ""]
    return ", ".join(w for w in words if w)


def _match(parts: list[str], pattern: list[str]) -> bool:
    """Does the relative path `parts` match the pattern's parts (`**` = any number of names)?"""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return (bool(parts) and (pattern[0].startswith(".") or not parts[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:]))


def _walk(base: str, rest: list[str]) -> tuple[list[str], int]:
    """Files below `base` whose relative path matches `rest`, and the directory links met."""
    recursive, dotted = "**" in rest, any(p.startswith(".") for p in rest)
    found, links = [], 0
    for dirpath, dirnames, filenames in os.walk(base):  # followlinks=False: a link is listed, not entered
        relative = [] if dirpath == base else os.path.relpath(dirpath, base).split(os.sep)
        if not recursive and len(relative) >= len(rest) - 1:
            dirnames[:] = []  # deeper than the pattern reaches
        dirnames[:] = [d for d in dirnames if (dotted or not d.startswith(".")) and d != "site-packages"]
        links += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        found += [os.path.join(dirpath, f) for f in filenames if _match([*relative, f], rest)]
    return [f for f in found if os.path.isfile(f)], links


def _expand(pattern: str) -> tuple[list[str], int]:
    """(files, directory links not followed) of one expanded pattern."""
    parts = pattern.split(os.sep)
    fixed = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), None)
    if fixed is None:
        return ([pattern] if os.path.isfile(pattern) else []), 0
    base = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    if not os.path.isdir(base):
        return [], 0
    files, links = _walk(base, parts[fixed:])
    return [os.path.normpath(f) if base == os.curdir else f for f in files], links


def list_files(patterns: tuple[str, ...], key: str = "data.paths") -> InputFiles:
    """Every file the patterns match, each once; a pattern matching no file is an error."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files: dict[str, str] = {}
    links = 0
    for pattern in patterns:
        expanded = os.path.expanduser(pattern.replace("{stdlib}", stdlib))
        walked = os.path.join(expanded, "**", "*") if os.path.isdir(expanded) else expanded
        root = walked.split("*", 1)[0].rsplit(os.sep, 1)[0] if "*" in walked else os.path.dirname(walked)
        matches, found_links = _expand(walked)
        if not matches:
            raise DataError(f"{key}: no files match '{walked}'")
        links += found_links
        for path in matches:
            if "site-packages" not in path.split(os.sep):
                files.setdefault(path, root)
    by_file: dict[str, str] = {}
    for path in sorted(files, key=lambda p: (os.path.islink(p), p)):
        by_file.setdefault(os.path.realpath(path), path)
    kept = sorted(by_file.values())
    return InputFiles([(files[p], p) for p in kept], links, len(files) - len(kept))


def expand_paths(patterns: tuple[str, ...], key: str = "data.paths") -> list[tuple[str, str]]:
    """(root, file) pairs for every file matched, each file once (`list_files`)."""
    return list_files(patterns, key).files

"""Scanning image folders before training: every file decoded once, all problems named together, verdicts cached.

Folder datasets (``imagefolder``, ``unlabeled``) are scanned when they are built, which the DataModule does in
``prepare_data`` (once per node, before the other ranks start) and again, from the cache, on every rank. The
scan finds unreadable files (truncated, corrupt, zero-byte, not an image), class folders with no readable
image, val classes unknown to train, an empty or missing folder. With ``on_bad_image="error"`` (default) they
are reported in one :class:`~sslpipe.errors.DataError`; with ``"skip"`` unreadable files are left out and
counted in a warning.

The cache: one JSON index per scanned folder under ``<cache_dir()>/scans/``, named by a hash of the folder's
real path, holding ``[size, mtime_ns, problem or null]`` per file. A file whose size and mtime are unchanged
is not reopened; new and changed files are checked, deleted ones dropped; a Pillow upgrade rescans everything.
The index is never written inside the data folder (datasets are often read-only or shared between users);
where the cache folder cannot be written the scan still works, uncached, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import PIL

from sslpipe.data.images import IMAGE_EXTENSIONS, image_problem, is_image_file
from sslpipe.errors import ConfigError, DataError, DataNotFoundError
from sslpipe.progress import progress

OnBadImage = Literal["error", "skip"]

SCAN_VERSION = 1  # bump when image_problem changes what it rejects: old indexes are then ignored
_CHUNK = 256  # files per thread-pool task: few futures for millions of files, still a smooth progress bar
_MAX_LISTED = 20  # problems named in an error message; the rest are counted

logger = logging.getLogger(__name__)


def log_warning(message: str) -> None:
    """Log ``message`` as a warning on rank 0 only (every rank builds the datasets; one message is enough)."""
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        logger.warning(message)


def cache_dir() -> str:
    """Where scan indexes live: ``$SSLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sslpipe``, else ``~/.cache/sslpipe``."""
    if os.environ.get("SSLPIPE_CACHE_DIR"):
        return os.environ["SSLPIPE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sslpipe")


# ------------------------------------------------------------------ listing
def class_folders(split_dir: str) -> list[str]:
    """Sorted names of the class sub-folders of ``split_dir`` (hidden ones such as ``.ipynb_checkpoints`` skipped).

    Raises :class:`DataNotFoundError` when ``split_dir`` is missing and :class:`DataError` when it has no sub-folder.
    """
    if not os.path.isdir(split_dir):
        raise DataNotFoundError(
            f"image folder {os.path.abspath(split_dir)!r} not found. Expected an ImageNet-style layout "
            "<root>/train/<class>/<image> and <root>/val/<class>/<image>; set --data.root to the folder that "
            "holds train/ and val/."
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"{os.path.abspath(split_dir)!r} has no class sub-folders; expected <split>/<class>/<image>. For a "
            "folder of images without classes use --data.dataset unlabeled."
        )
    return classes


def list_images(folder: str) -> list[str]:
    """Paths, relative to ``folder`` and sorted, of the image files under it (recursive, following links).

    Image files are those with one of :data:`~sslpipe.data.images.IMAGE_EXTENSIONS` in any case; hidden
    files and folders are skipped.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        found += [name if rel == "." else os.path.join(rel, name) for name in filenames if is_image_file(name)]
    return sorted(found)


def shared_classes(train_dir: str, val_dir: str) -> list[str]:
    """The class list of ``train_dir``, which also labels ``val_dir``; checks that val's classes are among them.

    A val class folder unknown to train is a :class:`DataError` (its images would get another class's index or
    none); a train class with no val folder only warns (validation does not measure it).
    """
    classes = class_folders(train_dir)
    val_classes = class_folders(val_dir)
    known, present = set(classes), set(val_classes)
    unknown = [c for c in val_classes if c not in known]
    if unknown:
        names = ", ".join(repr(c) for c in unknown[:_MAX_LISTED]) + (
            f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        )
        raise DataError(
            f"val class folder(s) {names} in {os.path.abspath(val_dir)!r} have no folder of the same name in "
            f"{os.path.abspath(train_dir)!r}. Labels are the indices of train's class folders, so these images "
            "would have no label: add the class to train/ or remove it from val/."
        )
    missing = [c for c in classes if c not in present]
    if missing:
        log_warning(
            f"data: {len(missing)} train class(es) have no folder in {os.path.abspath(val_dir)!r} "
            f"({', '.join(missing[:_MAX_LISTED])}{' ...' if len(missing) > _MAX_LISTED else ''}); "
            "validation does not measure them. Val labels still use train's class indices."
        )
    return classes


# ------------------------------------------------------------------ checking, with the cache
def _index_path(real_folder: str) -> str:
    name = hashlib.sha1(real_folder.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "scans", f"{name}.json")


def _read_index(path: str, real_folder: str) -> dict[str, list]:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return {}
    same = index.get("version") == SCAN_VERSION and index.get("pillow") == PIL.__version__
    return index.get("files", {}) if same and index.get("folder") == real_folder else {}


def _write_index(path: str, real_folder: str, files: dict[str, list]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"version": SCAN_VERSION, "pillow": PIL.__version__, "folder": real_folder, "files": files}, f)
        os.replace(tmp, path)  # atomic: ranks or nodes writing the same index never leave half a file
    except OSError as err:
        log_warning(f"data: cannot write the scan cache {path!r} ({err}); the next run rescans. Set SSLPIPE_CACHE_DIR.")


def check_images(folder: str, files: Sequence[str], desc: str = "checking images") -> dict[str, str]:
    """``{relative path: problem}`` for each of ``files`` (relative to ``folder``) that cannot be read.

    Files are checked on a thread pool (decoders and file reads release the GIL) with a progress bar; a
    file is reopened only if it is new to the cache or its size or mtime changed.
    """
    real = os.path.realpath(folder)
    index_path = _index_path(real)
    known = _read_index(index_path, real)

    def check(chunk: Sequence[str]) -> list[tuple[str, Optional[list], Optional[str]]]:
        out: list[tuple[str, Optional[list], Optional[str]]] = []
        for rel in chunk:
            path = os.path.join(folder, rel)
            try:
                stat = os.stat(path)
            except OSError as err:  # a dangling link, or deleted since listing: report, do not cache
                out.append((rel, None, f"{type(err).__name__}: {err.strerror}"))
                continue
            entry = known.get(rel)
            if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
                entry = [stat.st_size, stat.st_mtime_ns, image_problem(path, stat.st_size)]
            out.append((rel, entry, entry[2]))
        return out

    entries: dict[str, list] = {}
    problems: dict[str, str] = {}
    pool = ThreadPoolExecutor()
    try:
        futures = [pool.submit(check, files[i : i + _CHUNK]) for i in range(0, len(files), _CHUNK)]

        def results() -> Iterator[tuple[str, Optional[list], Optional[str]]]:
            for future in as_completed(futures):
                yield from future.result()

        for rel, entry, problem in progress(results(), desc=desc, total=len(files)):
            if entry is not None:
                entries[rel] = entry
            if problem is not None:
                problems[rel] = problem
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: do not wait for the queued chunks
    if entries != known:
        _write_index(index_path, real, entries)
    return problems


# ------------------------------------------------------------------ a scanned folder and the policy
@dataclass
class FolderScan:
    """What a scan found in one folder.

    Attributes:
        folder: the scanned folder.
        files: relative paths of its image files, sorted (``<class>/...`` when it has classes).
        problems: ``{relative path: why it cannot be read}``.
        classes: the class sub-folders scanned, or ``None`` for a folder without classes.
    """

    folder: str
    files: list[str]
    problems: dict[str, str]
    classes: Optional[list[str]] = None

    def readable(self) -> list[str]:
        """The files without a problem, in order."""
        return [f for f in self.files if f not in self.problems]

    @property
    def empty_classes(self) -> list[str]:
        """Class folders with no readable image."""
        if self.classes is None:
            return []
        filled = {f.split(os.sep, 1)[0] for f in self.readable()}
        return [c for c in self.classes if c not in filled]


def scan_folder(folder: str, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """List and check the images under ``folder``: all of them, or those under its ``classes`` sub-folders."""
    if not os.path.isdir(folder):
        raise DataNotFoundError(f"image folder {os.path.abspath(folder)!r} not found; check --data.root.")
    if classes is None:
        files = list_images(folder)
    else:
        files = [os.path.join(c, rel) for c in classes for rel in list_images(os.path.join(folder, c))]
    problems = check_images(folder, files, desc=f"checking {len(files)} images in {folder}")
    return FolderScan(folder, files, problems, None if classes is None else list(classes))


def usable_files(scan: FolderScan, on_bad_image: OnBadImage) -> list[str]:
    """The files of ``scan`` to use: with ``error`` all of them, or a :class:`DataError` naming every problem;
    with ``skip`` the readable ones, the rest counted in a warning."""
    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    where = os.path.abspath(scan.folder)
    if not scan.files:
        raise DataError(
            f"no image files under {where!r} (looked for {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}, any case, "
            "recursively). Check --data.root."
        )
    problems, empty = scan.problems, scan.empty_classes
    if on_bad_image == "error" and (problems or empty):
        lines = []
        if problems:
            lines.append(f"{len(problems)} of {len(scan.files)} image files under {where!r} cannot be read:")
            lines += [f"  {os.path.join(where, rel)}: {problems[rel]}" for rel in sorted(problems)[:_MAX_LISTED]]
            if len(problems) > _MAX_LISTED:
                lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        if empty:
            lines.append(f"class folders with no readable image under {where!r}: {', '.join(empty)}")
        lines.append(
            "Fix or delete them, or pass --data.on_bad_image skip to train without them "
            "(an empty class keeps its index and has no images)."
        )
        raise DataError("\n".join(lines))
    readable = scan.readable()
    if not readable:
        raise DataError(f"none of the {len(scan.files)} image files under {where!r} can be read.")
    if problems:
        first = sorted(problems)[0]
        log_warning(
            f"data: skipping {len(problems)} unreadable image file(s) of {len(scan.files)} under {where!r} "
            f"(first: {first}: {problems[first]}); --data.on_bad_image error lists them all."
        )
    if empty:
        log_warning(f"data: class folders with no readable image under {where!r}: {', '.join(empty)} (kept, empty)")
    return readable

"""Checks of an embedded store's file before it is opened: one clear error instead of a library's own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from malloc.serving.store.errors import StoreError


def check_store_file(url: str, path: Path) -> None:
    """The store file ``path`` can be created or opened: its folder exists and is writable (probed by creating
    and removing a file, since permission bits say nothing for root or on read-only mounts), and ``path`` is not a
    folder. The folder is never created: a mistyped path fails here instead of scattering stores.

    Raises:
        StoreError: one line naming the URL and what was expected.
    """
    folder = path.parent
    if not folder.exists():
        raise StoreError(f"store {url!r}: folder {folder} does not exist; expected an existing folder for the "
                         "store file (create it first)")
    if not folder.is_dir():
        raise StoreError(f"store {url!r}: {folder} is not a folder; expected a path inside an existing folder")
    if path.is_dir():
        raise StoreError(f"store {url!r}: {path} is a folder; expected the path of the store file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".store-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StoreError(f"store {url!r}: cannot write in folder {folder} ({exc.strerror or exc}); expected a "
                         "writable folder") from exc


__all__ = ["check_store_file"]

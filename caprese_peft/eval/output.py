"""Report folders written all or nothing: checked before any work, filled in a staging folder, renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``output_dir`` as a Path; raises when it is a file, or a non-empty folder and ``overwrite`` is False."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"The output {path} is a file; pass a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"The output folder {path} exists and is not empty; choose another folder or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    return path


@contextmanager
def staged_output(output_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to write a report into; on a clean exit it replaces ``output_dir``.

    The staging folder sits next to ``output_dir`` (same file system, so the final rename is atomic).
    If the block raises, the staging folder is removed and ``output_dir`` is left as it was: it is
    either complete or untouched. A non-empty ``output_dir`` is replaced only with ``overwrite=True``.
    """
    output = check_output_dir(output_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    old = None
    try:
        yield staging
        if output.exists():  # an empty folder, or one overwrite replaces: move it aside until the rename
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
        try:
            os.replace(staging, output)
        except BaseException:
            if old is not None:
                os.replace(old / output.name, output)
                old.rmdir()
                old = None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["check_output_dir", "staged_output"]

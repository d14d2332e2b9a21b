"""The export folder's life: built as RUN/export.tmp/, swapped in for RUN/export/ so that an interruption at any
point leaves either the previous export or the new one complete, never none and never a partial one."""

from __future__ import annotations

import shutil
from pathlib import Path


def tidy_leftovers(run_dir: Path, log=print) -> None:
    """Clear what an interrupted export left: export.tmp/ is unfinished (removed); export.old/ is the previous
    export, complete, put back when export/ is missing (the interruption fell between the two renames of
    `replace_folder`) and removed otherwise. A complete export/ is never touched."""
    final, old = run_dir / "export", run_dir / "export.old"
    shutil.rmtree(run_dir / "export.tmp", ignore_errors=True)
    if old.is_dir() and not final.exists():
        old.rename(final)
        log(f"restored {final} from {old}, left by an interrupted export")
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(new: Path, final: Path) -> None:
    """Put the folder `new` in the place of `final` so that, whenever this is interrupted, a complete `final` or a
    complete FINAL.old (which `tidy_leftovers` puts back) exists: rename final aside, rename new in, remove the old."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)

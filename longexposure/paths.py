"""Where the project reads and writes outside the repository, and how a file there is replaced.

`shared_dir()`: the shared data and reference folder (`LONGEXPOSURE_SHARED`, else `shared/` beside the
repository or beside the working directory). `cache_dir()`: what the project builds for itself
(`LONGEXPOSURE_CACHE`, else `~/.cache/longexposure`; never inside the repository). `default_tokenizer()`: the
OPT tokenizer in the shared folder. `write_atomic` / `write_text_atomic`: the one way a file is replaced whole.

Core modules import this; the suite runner sits above them and imports it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """`LONGEXPOSURE_SHARED` or the `shared/` folder beside the repository, when it exists."""
    env = os.environ.get("LONGEXPOSURE_SHARED")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    return next((p for p in candidates if p.is_dir()), None)


def cache_dir() -> Path:
    """`$LONGEXPOSURE_CACHE`, else `~/.cache/longexposure` (never inside the repository)."""
    return Path(os.environ.get("LONGEXPOSURE_CACHE") or Path.home() / ".cache" / "longexposure").expanduser()


def default_tokenizer() -> Path:
    """The OPT tokenizer in `shared/data/opt-tokenizer` (env `LONGEXPOSURE_TOKENIZER` overrides)."""
    if os.environ.get("LONGEXPOSURE_TOKENIZER"):
        return Path(os.environ["LONGEXPOSURE_TOKENIZER"])
    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(
            "no OPT tokenizer: set LONGEXPOSURE_TOKENIZER or LONGEXPOSURE_SHARED (shared/data/opt-tokenizer)"
        )
    return shared / "data" / "opt-tokenizer"


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(file)` into a temporary file beside `path`, synced, then renamed over it: readers see no
    file, the old one or the whole new one, never a torn write (a kill leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` of a text (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode()))

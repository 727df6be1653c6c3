"""The user cache directory for converted models and extracted text: ``$RABIT_CACHE_DIR`` or
``~/.cache/rabit-compiler``. Never inside the installed package."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def cache_dir(*parts: str) -> Path:
    """Return ``<cache root>/<parts...>``, created if missing.

    The root is ``$RABIT_CACHE_DIR`` when set (and non-empty), else ``~/.cache/rabit-compiler``.
    Raises ValueError if the root would lie inside the ``rabit_compiler`` package directory.
    """
    env = os.environ.get("RABIT_CACHE_DIR", "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "rabit-compiler"
    root = root.resolve()
    if root == _PACKAGE_DIR or _PACKAGE_DIR in root.parents:
        raise ValueError(f"the rabit-compiler cache must not live inside the package ({_PACKAGE_DIR}); "
                         f"got {root} (set RABIT_CACHE_DIR elsewhere)")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

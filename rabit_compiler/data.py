"""User text in, token windows out: a tolerant text reader, the Lee news corpus (from the gensim wheel,
never installed), and fixed-length token windows for calibration, training and evaluation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rabit_compiler.cache import cache_dir

logger = logging.getLogger("rabit_compiler")

_FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # latin-1 decodes any byte string, so the chain always ends
_LEE_FILES = ("lee_background.cor", "lee.cor")
_LEE_IN_WHEEL = "gensim/test/test_data/"
# The test data is identical in every gensim wheel; pin one wheel so the download is reproducible on any
# machine (a pure download: gensim is never installed or imported, so its platform does not matter).
_GENSIM_PIP_ARGS = ("gensim==4.4.0", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")

TextSource = str | os.PathLike | Iterable[str | os.PathLike]


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    """Read a user text file and return its contents.

    With ``encoding=None`` the file is decoded as UTF-8 (a leading BOM is dropped); if that fails, as cp1252,
    then latin-1, with a warning on the ``rabit_compiler`` logger naming the encoding chosen. An explicit
    ``encoding`` is used strictly. Raises FileNotFoundError for a missing file and ValueError for a file
    with no non-whitespace text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    raw = path.read_bytes()
    if encoding is not None:
        text = raw.decode(encoding)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            for candidate in _FALLBACK_ENCODINGS:
                try:
                    text = raw.decode(candidate)
                except UnicodeDecodeError:
                    continue
                logger.warning("%s is not valid UTF-8 (byte 0x%02x at offset %d); decoded it as %s. Pass "
                               "encoding=... to choose another.", path, raw[err.start], err.start, candidate)
                break
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def _download_lee(target: Path) -> None:
    """Download the gensim wheel into a temporary directory and extract the two Lee files into ``target``."""
    with tempfile.TemporaryDirectory(prefix="rabit-gensim-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", tmp, *_GENSIM_PIP_ARGS]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if result.returncode != 0 or not wheels:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                "could not download the Lee corpus (it ships inside the gensim wheel on PyPI; is PyPI reachable?).\n"
                f"command: {' '.join(command)}\n{tail}\n"
                f"Alternatively put lee_background.cor and lee.cor (from gensim/test/test_data/) into {target}.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in _LEE_FILES:
                data = wheel.read(_LEE_IN_WHEEL + name)
                partial = target / (name + ".partial")
                partial.write_bytes(data)
                os.replace(partial, target / name)  # atomic: a later call never sees a half-written file


def lee_corpus() -> tuple[str, str]:
    """Return ``(train_text, heldout_text)``: the Lee news corpus, ``lee_background.cor`` (299 ABC news
    articles, one per line; for calibration and training) and ``lee.cor`` (49 other articles; held out).

    The first call runs ``pip download`` for the gensim wheel (~28 MB) and caches the two files under
    ``cache_dir("text", "lee")``; later calls read the cache. The files are Latin-1 encoded.
    """
    target = cache_dir("text", "lee")
    if not all((target / name).is_file() for name in _LEE_FILES):
        _download_lee(target)
    train, heldout = (read_text(target / name, encoding="latin-1") for name in _LEE_FILES)
    return train, heldout


def _documents(texts: TextSource) -> list[str]:
    """A str is one document's text; a path (``os.PathLike``) is read with :func:`read_text`; an iterable
    yields documents of either kind."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, os.PathLike):
        return [read_text(texts)]
    if isinstance(texts, bytes):
        raise TypeError("token_windows takes text (str), a path, or an iterable of those, not bytes")
    return [doc for item in texts for doc in _documents(item)]


def token_windows(tokenizer: Any, texts: TextSource, seq_len: int, max_windows: int | None = None,
                  max_context: int | None = None) -> torch.Tensor:
    """Tokenize ``texts`` and cut the token stream into non-overlapping windows.

    ``texts``: a str (the text itself), a path (``pathlib.Path`` / ``os.PathLike``, read with
    :func:`read_text`), or an iterable of those, one document each. Documents are tokenized without special
    tokens and joined with ``tokenizer.eos_token_id`` between them (no BOS is added); the remainder shorter
    than ``seq_len`` is dropped. ``max_windows`` keeps only the first windows.

    Returns a LongTensor ``[num_windows, seq_len]``. Raises ValueError if ``seq_len <= 0``, if
    ``seq_len > max_context`` (when given: the model's context length), if ``max_windows < 1``, or if the
    text yields fewer than ``seq_len`` tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if max_context is not None and seq_len > max_context:
        raise ValueError(f"seq_len {seq_len} exceeds the model context of {max_context} tokens")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    documents = _documents(texts)
    eos = getattr(tokenizer, "eos_token_id", None)
    if len(documents) > 1 and eos is None:
        logger.warning("the tokenizer has no EOS token: %d documents are joined without a separator",
                       len(documents))
    ids: list[int] = []
    needed = None if max_windows is None else max_windows * seq_len
    for i, doc in enumerate(documents):
        if i and eos is not None:
            ids.append(eos)
        # verbose=False: no "sequence longer than the model maximum" warning; windows are cut below
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    num_windows = len(ids) // seq_len
    if num_windows == 0:
        raise ValueError(f"the text yields {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    return torch.tensor(ids[: num_windows * seq_len], dtype=torch.long).view(num_windows, seq_len)

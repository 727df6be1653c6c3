"""Text loading and token windows: encoding fallback, clear errors, window shapes and EOS separators.
A tiny word-level tokenizer built in the test: no downloads, no model."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rabit_compiler.cache import cache_dir
from rabit_compiler.data import read_text, token_windows

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def ids(text: str) -> list[int]:
    return [WORDS.index(w) + 2 for w in text.split()]


def test_read_text_latin1_falls_back_and_logs(tmp_path, caplog):
    path = tmp_path / "prices.txt"
    path.write_bytes("It cost £5 at the café.\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="rabit_compiler"):
        text = read_text(path)
    assert text == "It cost £5 at the café.\n"
    assert any("cp1252" in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)


def test_read_text_utf8_is_silent_and_explicit_encoding_is_strict(tmp_path, caplog):
    path = tmp_path / "u.txt"
    path.write_text("£ in UTF-8", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="rabit_compiler"):
        assert read_text(path) == "£ in UTF-8"
    assert not caplog.records
    assert read_text(path, encoding="latin-1") == "£ in UTF-8".encode().decode("latin-1")
    path.write_bytes("£".encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):
        read_text(path, encoding="utf-8")


def test_read_text_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "blank.txt")


def test_token_windows_shape_and_remainder(tokenizer):
    text = " ".join(WORDS * 3)  # 24 tokens
    windows = token_windows(tokenizer, text, seq_len=5)
    assert windows.dtype == torch.long and windows.shape == (4, 5)  # 4 remainder tokens dropped
    assert windows.flatten().tolist() == ids(text)[:20]
    assert token_windows(tokenizer, text, seq_len=5, max_windows=2).tolist() == windows[:2].tolist()
    assert token_windows(tokenizer, text, seq_len=24).shape == (1, 24)


def test_token_windows_eos_between_documents(tokenizer, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("e f")
    windows = token_windows(tokenizer, ["a b c", "d", path], seq_len=4)
    eos = tokenizer.eos_token_id
    assert windows.tolist() == [ids("a b c") + [eos], ids("d") + [eos] + ids("e f")]  # no trailing EOS
    assert token_windows(tokenizer, path, seq_len=2).tolist() == [ids("e f")]  # a path is read, not tokenized


def test_token_windows_errors(tokenizer):
    with pytest.raises(ValueError, match="fewer"):
        token_windows(tokenizer, "a b c", seq_len=4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            token_windows(tokenizer, "a b c", seq_len=bad)
    with pytest.raises(ValueError, match="context"):
        token_windows(tokenizer, "a b c d e", seq_len=5, max_context=4)
    assert token_windows(tokenizer, "a b c d", seq_len=4, max_context=4).shape == (1, 4)


def test_cache_dir_from_env_and_never_inside_package(tmp_path, monkeypatch):
    monkeypatch.setenv("RABIT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir("text", "lee") == (tmp_path / "c" / "text" / "lee").resolve()
    assert (tmp_path / "c" / "text" / "lee").is_dir()
    import rabit_compiler

    monkeypatch.setenv("RABIT_CACHE_DIR", str(rabit_compiler.__path__[0]))
    with pytest.raises(ValueError, match="inside the package"):
        cache_dir()

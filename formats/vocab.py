"""The NE vocab section: one (bytes, score) entry per token id (docs/design.md §2 item 4).

Two rules, as neural-speed's converters write them:
- byte-level BPE (GPT-2 family, SmolLM2, GGUF `gpt2` vocabularies): tokens
  are spelled in GPT-2's byte-to-unicode alphabet; the entry is the raw
  bytes, score -i for token i, -10000 for added/special tokens.
- sentencepiece (neural-speed's convert_llama): U+2581 becomes a space, a
  byte piece `<0xNN>` is that byte, a control piece is empty, the unknown
  piece is " \u2047 "; the score is the piece's score.
Ids past the tokenizer (an embedding padded beyond it) get " \u2047 " with
score i (sentencepiece) or -i (byte-level BPE, whose rule is -i).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from netp.errors import NetpError

Vocab = list[tuple[bytes, float]]

UNKNOWN_PIECE = " \u2047 ".encode("utf-8")
ADDED_TOKEN_SCORE = -10000.0
SP_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 2, 3, 4, 6


@functools.cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's unicode character -> byte table (the inverse of bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def byte_level_bytes(token: str) -> bytes:
    """A token spelled in GPT-2's byte alphabet -> its bytes; other text -> UTF-8."""
    decoder = gpt2_byte_decoder()
    try:
        return bytes([decoder[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


def sentencepiece_bytes(piece: str) -> bytes:
    """A normal sentencepiece piece -> bytes, U+2581 read as a space."""
    return piece.replace(SP_SPACE, " ").encode("utf-8")


def _check_size(path: Any, n_tokens: int, n_vocab: int) -> None:
    if n_tokens > n_vocab:
        raise NetpError(path, f"the tokenizer has {n_tokens} tokens but the model's embedding only {n_vocab} rows")


def byte_level_vocab(tokens: Mapping[int, bytes], added: Iterable[int], n_vocab: int) -> Vocab:
    """tokens: id -> raw bytes; added: ids of added/special tokens."""
    added = set(added)
    vocab: Vocab = []
    for i in range(n_vocab):
        text = tokens.get(i)
        if text is None:
            vocab.append((UNKNOWN_PIECE, -float(i)))
        else:
            vocab.append((text, ADDED_TOKEN_SCORE if i in added else -float(i)))
    return vocab


def sentencepiece_vocab(pieces: Mapping[int, tuple[bytes, float]], n_vocab: int) -> Vocab:
    """pieces: id -> (entry bytes after the sentencepiece rules, score)."""
    return [pieces.get(i, (UNKNOWN_PIECE, float(i))) for i in range(n_vocab)]


# -- tokenizer.json ------------------------------------------------------------
def _has_byte_level(component: Any) -> bool:
    if isinstance(component, dict):
        if component.get("type") == "ByteLevel":
            return True
        return any(_has_byte_level(c) for key in ("pretokenizers", "decoders") for c in component.get(key) or ())
    return False


def vocab_from_tokenizer_json(path: Path, n_vocab: int) -> Vocab:
    from netp.formats.paths import TOKENIZER_JSON_CAP, read_json

    spec = read_json(path, TOKENIZER_JSON_CAP, "a tokenizer.json")
    try:
        return _vocab_from_spec(spec, path, n_vocab)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a field of the wrong JSON type
        raise NetpError(path, f"not a readable tokenizer.json ({type(e).__name__}: {e})") from e


def _vocab_from_spec(spec: Any, path: Path, n_vocab: int) -> Vocab:
    model = spec["model"]
    added = {int(a["id"]): a for a in spec.get("added_tokens") or ()}
    kind = model.get("type")
    if kind == "BPE":
        ids = {int(i): tok for tok, i in model["vocab"].items()}
    elif kind == "Unigram":
        ids = {i: piece for i, (piece, _) in enumerate(model["vocab"])}
    else:
        raise NetpError(path, f"tokenizer model {kind!r} is not supported (netp reads BPE and Unigram)")
    _check_size(path, max([*ids, *added], default=-1) + 1, n_vocab)

    if kind == "BPE" and (_has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(spec.get("decoder"))):
        tokens = {i: byte_level_bytes(tok) for i, tok in ids.items()}
        tokens |= {i: a["content"].encode("utf-8") for i, a in added.items()}  # added tokens are plain text
        return byte_level_vocab(tokens, added, n_vocab)

    # sentencepiece-style (LLaMA's BPE with byte fallback, or Unigram).
    unk = model.get("unk_id") if kind == "Unigram" else None
    if unk is None and model.get("unk_token") is not None:
        unk = model["vocab"].get(model["unk_token"]) if kind == "BPE" else None
    byte_fallback = kind == "Unigram" or bool(model.get("byte_fallback"))
    pieces: dict[int, tuple[bytes, float]] = {}
    for i, piece in ids.items():
        score = float(model["vocab"][i][1]) if kind == "Unigram" else -float(i)
        if i == unk:
            pieces[i] = (UNKNOWN_PIECE, score)
        elif i in added and added[i].get("special"):
            pieces[i] = (b"", score)
        elif byte_fallback and (m := _BYTE_PIECE.fullmatch(piece)):
            pieces[i] = (bytes([int(m.group(1), 16)]), score)
        else:
            pieces[i] = (sentencepiece_bytes(piece), score)
    for i, a in added.items():
        if i not in pieces:
            pieces[i] = (b"" if a.get("special") else a["content"].encode("utf-8"), ADDED_TOKEN_SCORE)
    return sentencepiece_vocab(pieces, n_vocab)


# -- tokenizer.model (sentencepiece) -------------------------------------------
def load_sentencepiece(path: Path) -> Any:
    import sentencepiece

    from netp.formats.paths import regular_file

    regular_file(path, "a sentencepiece model")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise NetpError(path, f"not a readable sentencepiece model ({e})") from e


def vocab_from_sentencepiece(path: Path, n_vocab: int) -> Vocab:
    sp = load_sentencepiece(path)
    n = sp.get_piece_size()
    _check_size(path, n, n_vocab)
    pieces: dict[int, tuple[bytes, float]] = {}
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            text = UNKNOWN_PIECE
        elif sp.is_control(i):
            text = b""
        elif sp.is_byte(i):
            text = bytes([int(piece[3:5], 16)])
        else:
            text = sentencepiece_bytes(piece)
        pieces[i] = (text, float(sp.get_score(i)))
    return sentencepiece_vocab(pieces, n_vocab)


# -- GGUF ------------------------------------------------------------------------
def vocab_from_gguf(meta: Mapping[str, Any], n_vocab: int, path: Any) -> Vocab:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise NetpError(path, "GGUF metadata lacks tokenizer.ggml.tokens")
    _check_size(path, len(tokens), n_vocab)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or meta.get("tokenizer.ggml.model") == "gpt2":
        added = [i for i, t in enumerate(types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)]
        return byte_level_vocab({i: byte_level_bytes(t) for i, t in enumerate(tokens)}, added, n_vocab)
    pieces: dict[int, tuple[bytes, float]] = {}
    for i, (piece, kind, score) in enumerate(zip(tokens, types, scores)):
        if kind == GGUF_UNKNOWN:
            text = UNKNOWN_PIECE
        elif kind == GGUF_CONTROL:
            text = b""
        elif kind == GGUF_BYTE and (m := _BYTE_PIECE.fullmatch(piece)):
            text = bytes([int(m.group(1), 16)])
        else:
            text = sentencepiece_bytes(piece)
        pieces[i] = (text, float(score))
    return sentencepiece_vocab(pieces, n_vocab)


# -- an HF model folder ------------------------------------------------------------
def vocab_for_folder(folder: Path, n_vocab: int) -> Vocab:
    """The vocab of an HF model folder: tokenizer.model's pieces and scores when
    there is one (sentencepiece), else tokenizer.json."""
    if os.path.lexists(folder / "tokenizer.model"):  # a FIFO there is refused by name, not skipped
        return vocab_from_sentencepiece(folder / "tokenizer.model", n_vocab)
    if os.path.lexists(folder / "tokenizer.json"):
        return vocab_from_tokenizer_json(folder / "tokenizer.json", n_vocab)
    raise NetpError(folder, "has no tokenizer (neither tokenizer.json nor tokenizer.model)")

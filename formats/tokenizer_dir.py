"""The tokenizer folder that travels beside an NE file (docs/design.md §2).

`ne-f32.bin` -> `ne-f32.tokenizer/`, always holding `tokenizer.json` and
`tokenizer_config.json`; quantize copies it to its output's folder, shard to
`OUTDIR/tokenizer/`, and the runtime encodes prompts with it
(`tokenizers.Tokenizer.from_file`), so token ids equal transformers'.

Where it comes from:
- an HF folder with tokenizer.json: the files copied as they are;
- an HF folder with only a sentencepiece tokenizer.model: converted with
  transformers' LlamaTokenizer from the pieces, the way transformers builds
  a sentencepiece tokenizer itself (no protobuf needed);
- a GGUF: built from its metadata with transformers'
  `convert_gguf_tokenizer`, the function `from_pretrained(..., gguf_file=)`
  uses, plus the digit split its `tokenizer.ggml.pre` names where transformers
  drops it (DIGITS_FIRST_PRE). transformers' own GGUF reader imports torch, so the metadata comes
  from gguf-py and is grouped here exactly as transformers'
  `get_gguf_tokenizer` groups it (a test holds the two together).
Every folder is written under a temporary name and renamed when complete.
It carries only the files netp knows (KNOWN_TOKENIZER_FILES), each read up to a size
cap, checked to be what its name says (JSON, UTF-8 text) and written as a
new regular file: a folder netp wrote holds no links, so a link or a FIFO
in one is refused rather than followed (an HF checkpoint's own files may be
links: the Hugging Face cache links them to blobs) (docs/design.md §8).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping

from netp.errors import NetpError
from netp.formats.atomic import atomic_dir
from netp.formats.hf import read_json_object
from netp.formats.names import KNOWN_TOKENIZER_FILES, OPTIONAL_TOKENIZER_FILES, TOKENIZER_FILES, TOKENIZER_SUFFIX
from netp.formats.paths import TOKENIZER_JSON_CAP, parse_json, read_capped



def tokenizer_dir_for(ne_path: str | os.PathLike) -> Path:
    """`ne-f32.bin` -> `ne-f32.tokenizer` beside it."""
    p = Path(ne_path)
    return p.with_name(p.stem + TOKENIZER_SUFFIX)


def checked_bytes(path: Path) -> bytes:
    """The bytes of known tokenizer file `path`, read up to the cap and checked to be
    what its name says: a JSON object for *.json, UTF-8 text for a template."""
    data = read_capped(path, TOKENIZER_JSON_CAP, "a tokenizer file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NetpError(path, "is not UTF-8 text") from e
    if path.suffix == ".json" and not isinstance(parse_json(path, text), dict):
        raise NetpError(path, "does not hold a JSON object")
    return data


def _write_new(path: Path, data: bytes) -> None:
    """A new regular file with the process's normal permissions (never a source's mode)."""
    with open(path, "xb") as f:
        f.write(data)


def _checkpoint_place(folder: Path) -> Path:
    """Where a checkpoint's own links may lead: its folder, or for a Hugging Face
    cache snapshot (`<repo>/snapshots/<rev>/`) the repo's cache folder, whose
    blobs/ the snapshot's files link to."""
    real = Path(os.path.realpath(folder))
    return real.parent.parent if real.parent.name == "snapshots" else real


def _checkpoint_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if present. A checkpoint's own files may be links (the Hugging Face
    cache, a folder of links to a shared copy), but these bytes travel into outputs: a link
    that leaves the checkpoint's place must reach a file others may read, never a private one."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        place, target = _checkpoint_place(folder), Path(os.path.realpath(path))
        if place not in target.parents and os.path.exists(target) and not os.stat(target).st_mode & stat.S_IROTH:
            raise NetpError(path, f"is a symlink to the private file {target}, outside the checkpoint's folder; "
                                  "netp copies tokenizer files into its outputs and will not publish it")
    return path


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = _checkpoint_file(src, name)
        if path is not None:
            _write_new(dst / name, checked_bytes(path))


def _own_files(src: Path) -> list[Path]:
    """The known files of a tokenizer folder netp wrote: regular files, no links."""
    if src.is_symlink():
        raise NetpError(src, "tokenizer folder is a symlink; netp writes it as a real folder and does not follow it")
    found = []
    for name in KNOWN_TOKENIZER_FILES:
        f = src / name
        try:
            mode = os.lstat(f).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise NetpError(f, f"is {what}; a tokenizer folder holds regular files only, and netp does not "
                               "follow links out of it")
        found.append(f)
    return found


def copy_tokenizer_folder(src: Path, target: Path) -> Path:
    """The one tokenizer copier: tokenizer folder `src` (one netp wrote: `<stem>.tokenizer/`
    beside an NE file, a shard set's `tokenizer/`) copied into the new folder `target`,
    atomically: only KNOWN_TOKENIZER_FILES, each checked and written anew (unknown files
    stay behind); a link or special file is refused. Returns `target`."""
    files = _own_files(src)
    with atomic_dir(target) as tmp:
        for f in files:
            _write_new(tmp / f.name, checked_bytes(f))
    return target


def copy_tokenizer_beside(src_ne: str | os.PathLike, target: Path) -> Path:
    """copy_tokenizer_folder of the folder beside NE file `src_ne` (`<stem>.tokenizer/`)
    into `target`; refused, naming `src_ne`, unless that folder holds TOKENIZER_FILES."""
    src = tokenizer_dir_for(src_ne)
    files = _own_files(src) if src.is_dir() or src.is_symlink() else []
    if not all(src / f in files for f in TOKENIZER_FILES):
        raise NetpError(src_ne, f"no tokenizer folder beside it ({src} with {' and '.join(TOKENIZER_FILES)})")
    return copy_tokenizer_folder(src, target)


# -- from an HF folder ------------------------------------------------------------
# tokenizer_config.json keys handed to a tokenizer class built from a sentencepiece model.
_CONFIG_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "chat_template", "model_max_length",
                "bos_token", "eos_token", "unk_token", "pad_token", "clean_up_tokenization_spaces")


def write_folder_tokenizer(folder: Path, out: Path) -> None:
    """Write the tokenizer of HF model folder `folder` into the (empty) folder `out`."""
    if _checkpoint_file(folder, "tokenizer.json") is not None:
        _copy_files(folder, out, ("tokenizer.json",) + OPTIONAL_TOKENIZER_FILES)
        if _checkpoint_file(folder, "tokenizer_config.json") is not None:
            _copy_files(folder, out, ("tokenizer_config.json",))
        else:  # tokenizer.json alone is a complete tokenizer; say which class reads it
            (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    elif (model := _checkpoint_file(folder, "tokenizer.model")) is not None:
        config_path = _checkpoint_file(folder, "tokenizer_config.json")
        config = read_json_object(config_path) if config_path is not None else {}
        write_sentencepiece_tokenizer(model, config, out)
        _copy_files(folder, out, OPTIONAL_TOKENIZER_FILES)
    else:
        raise NetpError(folder, "has no tokenizer (neither tokenizer.json nor tokenizer.model)")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as bytes."""
    pos = 0
    value: int | bytes
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):
            value, pos = 0, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield field, value


def sentencepiece_model_facts(path: Path) -> tuple[int, list[int]]:
    """(trainer model_type: 1 unigram, 2 BPE, ...; the type of every piece: 1 normal,
    2 unknown, 3 control, 4 user defined, 5 unused, 6 byte) from the model's protobuf."""
    model_type, piece_types = 1, []
    try:
        for field, value in _proto_fields(read_capped(path, TOKENIZER_JSON_CAP, "a sentencepiece model")):
            if field == 1:  # ModelProto.pieces: SentencePiece {piece = 1, score = 2, type = 3}
                piece_types.append(next((v for f, v in _proto_fields(value) if f == 3), 1))
            elif field == 2:  # ModelProto.trainer_spec: TrainerSpec {model_type = 3}
                model_type = next((v for f, v in _proto_fields(value) if f == 3), 1)
    except (IndexError, ValueError, TypeError) as e:
        raise NetpError(path, f"not a readable sentencepiece model ({e})") from e
    return int(model_type), [int(t) for t in piece_types]


def write_sentencepiece_tokenizer(model_path: Path, config: Mapping[str, Any], out: Path) -> None:
    """A sentencepiece BPE model -> tokenizer.json + tokenizer_config.json via transformers' LlamaTokenizer."""
    from netp.formats.vocab import load_sentencepiece

    sp = load_sentencepiece(model_path)
    model_type, piece_types = sentencepiece_model_facts(model_path)
    if model_type != 2:
        raise NetpError(model_path, "is a sentencepiece unigram model without tokenizer.json; netp converts "
                                    "sentencepiece BPE models (LLaMA's) only: add the model's tokenizer.json")
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # As transformers' SentencePieceExtractor: merges in vocab order; control
    # pieces are special tokens, user-defined ones plain added tokens.
    added = [AddedToken(sp.id_to_piece(i), normalized=False, special=t == 3)
             for i, t in enumerate(piece_types) if t in (3, 4)]
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    kwargs: dict[str, Any] = {"unk_token": piece(sp.unk_id()), "bos_token": piece(sp.bos_id()),
                              "eos_token": piece(sp.eos_id()), "add_bos_token": True}
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, dict) and "content" in value:  # older configs spell tokens as AddedToken dicts
            value = value["content"]
        if value is not None:
            kwargs[key] = value
    try:
        tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), additional_special_tokens=added, **kwargs)
        tok.save_pretrained(out)
    except Exception as e:  # transformers raises ValueError/TypeError/... on odd configs
        raise NetpError(model_path, f"cannot build a tokenizer from it ({type(e).__name__}: {e})") from e


# -- from a GGUF ---------------------------------------------------------------------
def gguf_tokenizer_parts(meta: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, tokenizer_dict, tokenizer_config) as transformers' get_gguf_tokenizer
    returns them, from metadata read with gguf-py."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING

    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokenizer_type = tokenizer.get("tokenizer_type")
    if tokenizer_type == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise
        tokenizer_config.setdefault("add_bos_token", True)
    elif tokenizer_type == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return meta["general.architecture"], tokenizer, tokenizer_config


# llama.cpp's `tokenizer.ggml.pre` names whose split is every digit alone, then GPT-2's
# regex (llama-vocab.cpp's regex_exprs); transformers' GGUF converter drops it (docs/design.md §2).
DIGITS_FIRST_PRE = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                              "mellum2"})


def gguf_pre_tokenizer(meta: Mapping[str, Any], backend: Any) -> None:
    """Give `backend` (transformers' conversion) the split `tokenizer.ggml.pre` names, where it lacks it."""
    from tokenizers import pre_tokenizers

    if meta.get("tokenizer.ggml.pre") in DIGITS_FIRST_PRE and isinstance(backend.pre_tokenizer,
                                                                         pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def write_gguf_tokenizer(meta: Mapping[str, Any], path: Path, out: Path) -> None:
    """Build tokenizer.json + tokenizer_config.json from a GGUF's metadata into `out`."""
    if "tokenizer.ggml.tokens" not in meta:
        raise NetpError(path, "GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

    try:
        architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_parts(meta)
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        gguf_pre_tokenizer(meta, backend)
        # The same kwargs AutoTokenizer.from_pretrained(..., gguf_file=) hands its tokenizer.
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
        tok.save_pretrained(out)
    except Exception as e:  # transformers raises ValueError/KeyError/... for tokenizers it cannot build
        raise NetpError(path, f"cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: {e})") from e


def check_tokenizer_files(folder: Path, target: str | os.PathLike) -> None:
    """Refuse a tokenizer folder that lacks one of TOKENIZER_FILES (before it is renamed into place)."""
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise NetpError(target, f"tokenizer folder would lack {', '.join(missing)}")


def build_tokenizer_dir(target: str | os.PathLike, write: Any, *args: Any) -> Path:
    """Run `write(*args, out)` into a temporary folder that becomes `target` when complete."""
    target = Path(target)
    with atomic_dir(target) as tmp:
        write(*args, tmp)
        check_tokenizer_files(tmp, target)
    return target

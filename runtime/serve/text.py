"""Text in and out of the server: chat messages through the model's chat
template, generated tokens as text, and stop strings cut exactly.

The chat template is the tokenizer folder's `chat_template.jinja`, else
`chat_template.json`'s, else `tokenizer_config.json`'s `chat_template`
(transformers' order), rendered by transformers' own sandboxed renderer
(`transformers.utils.chat_template_utils`, which imports no torch:
docs/design.md §1) with the folder's special tokens, as apply_chat_template
does; the result is encoded without adding special tokens, as it does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from netp.errors import NetpError
from netp.formats.paths import SIDE_JSON_CAP, read_capped, read_json
from netp.runtime.run import TextStream
from netp.runtime.sources import tokenizer_dir

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _side_file(model: Path, name: str) -> Path | None:
    """Tokenizer file `name` travelling with the model, checked against the manifest in a shard set."""
    folder = tokenizer_dir(model)
    if folder is None:
        return None
    if model.is_dir():
        from netp.formats.shardset import ShardSet
        from netp.models import architecture_names

        shards = ShardSet.load(model, architecture_names())
        if not any(f.file == name for f in shards.manifest.tokenizer_files):
            return None
        return shards.tokenizer_file(name)
    path = folder / name
    return path if path.is_file() else None


def _template_of(value: Any, path: Path) -> str | None:
    """A chat_template value: a string, or a list of named templates (the "default" one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise NetpError(path, "chat_template is neither a string nor a list holding a \"default\" template")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as transformers saves it
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A model's chat template, compiled once."""

    def __init__(self, source: Path, template: str, special: dict[str, str]):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.source, self.template, self.special = source, template, special
        try:
            _compile_jinja_template(template)
        except Exception as e:  # jinja's TemplateSyntaxError and kin
            raise NetpError(source, f"the chat template does not compile: {e}") from e

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The conversation as the prompt text, ending with the assistant's turn opened.
        A template's own refusal (roles that do not alternate...) raises ValueError."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                add_generation_prompt=True, **self.special)
        except Exception as e:  # the template is code from the model folder: any failure is the request's
            raise ValueError(f"the chat template refused the messages: {e}") from e
        return rendered[0]


def load_chat_template(model: Path) -> ChatTemplate | None:
    """The model's chat template, or None when its tokenizer folder has none."""
    model = Path(model)
    config_path = _side_file(model, "tokenizer_config.json")
    config = read_json(config_path) if config_path is not None else {}
    if not isinstance(config, dict):
        raise NetpError(config_path, "is not a JSON object")
    special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
    for name in TEMPLATE_FILES:
        path = config_path if name == "tokenizer_config.json" else _side_file(model, name)
        if path is None:
            continue
        if name.endswith(".jinja"):
            try:
                template: str | None = read_capped(path, SIDE_JSON_CAP, "a chat template").decode("utf-8")
            except UnicodeDecodeError as e:
                raise NetpError(path, "is not UTF-8 text") from e
        else:
            data = config if name == "tokenizer_config.json" else read_json(path)
            template = _template_of(data.get("chat_template") if isinstance(data, dict) else None, path)
        if template:
            return ChatTemplate(path, template, special)
    return None


class TokenText:
    """Generated tokens as text, decoded as ne-run prints them (the NE vocab's
    bytes, complete UTF-8 characters only, EOS not shown)."""

    def __init__(self, vocab: Sequence[tuple[bytes, float]], eos: int):
        self.parts: list[str] = []
        self.stream = TextStream(vocab, eos, out=self)

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def add(self, token: int) -> str:
        """The text this token completes (may be empty)."""
        self.stream(token)
        return self._take()

    def finish(self) -> str:
        self.parts.append(self.stream.decoder.decode(b"", final=True))
        return self._take()

    def _take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


class StopText:
    """Text as it streams, cut where the first stop string begins.

    What `add` returns is safe to send: the text never includes a stop
    string, nor any tail that could still grow into one (that tail is held
    back until the next piece decides)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.hit = False

    def add(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        # A stop string cannot begin inside text already sent: that text was
        # never the start of one (see held_back).
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            return self._send_to(min(found))
        return self._send_to(len(self.text) - self.held_back())

    def held_back(self) -> int:
        """Length of the longest tail of the text that is a proper start of a stop string."""
        tail = len(self.text) - self.sent
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, tail), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def finish(self) -> str:
        """The rest, once generation ended without a stop string."""
        return "" if self.hit else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

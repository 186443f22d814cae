"""Text <-> token ids, chat prompts, and streaming detokenization for one model directory.

:class:`Tokenizer` reads ``tokenizer.json`` (HF ``tokenizers`` format) and
``tokenizer_config.json``; it renders chat templates the way transformers does (same jinja2
settings), so prompts are token-for-token identical. :func:`byte_level_bpe` builds the
``tokenizer.json`` of a GGUF file's byte-level BPE vocabulary.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from kvcake.common.config import read_json_object
from kvcake.common.errors import InvalidParamsError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 character decodes to


class Tokenizer:
    """One model's tokenizer. Build it with :meth:`from_dir`."""

    def __init__(self, backend: Backend, chat_template: str | None, bos_token: str | None,
                 eos_token: str | None, eos_token_ids: tuple[int, ...]) -> None:
        self._backend = backend
        self._chat_template = chat_template
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` and the generation EOS ids of
        ``config.json`` / ``generation_config.json``; InvalidParamsError names a missing or
        unreadable file."""
        root = Path(path)
        backend = _load_backend(root / "tokenizer.json")
        settings = _optional_json(root / "tokenizer_config.json")
        bos, eos = _token_text(settings.get("bos_token")), _token_text(settings.get("eos_token"))
        eos_ids = [backend.token_to_id(eos)] if eos else []
        for name in ("config.json", "generation_config.json"):
            eos_ids += _id_list(_optional_json(root / name).get("eos_token_id"))
        unique = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        return cls(backend, _chat_template(root, settings), bos, eos, unique)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation (the tokenizer's EOS first, then the model configs')."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return None if self._bos_token is None else self._backend.token_to_id(self._bos_token)

    @property
    def vocab_size(self) -> int:
        """Token ids in use, added tokens included (the model may have padding rows beyond)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens: dropped by ``decode(skip_special_tokens=True)``."""
        added = self._backend.get_added_tokens_decoder()
        return frozenset(token_id for token_id, token in added.items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, as the vocabulary spells it (None: not in it)."""
        token_id = self._backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token spellings in it become their single ids.
        ``add_special_tokens`` adds BOS/EOS where the tokenizer asks for them."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes of an incomplete UTF-8 character come out as U+FFFD."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``role``/``content`` mappings), as HF renders it.

        Raises InvalidParamsError when there is no chat template or the template rejects
        the messages (its ``raise_exception``).
        """
        if self._chat_template is None:
            raise InvalidParamsError("this tokenizer has no chat template; send a plain prompt")
        try:
            return _compile(self._chat_template).render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token or "", eos_token=self._eos_token or "")
        except jinja2.TemplateError as err:
            raise InvalidParamsError(f"chat template failed: {err}") from None


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas for streaming.

    Invariant: ``"".join(deltas) + finish() == tokenizer.decode(all ids)``. Two offsets into
    ``ids`` mark the text already emitted:

        ids:  [ ... emitted ... | context | not yet emitted ]
                                ^prefix   ^read

    Each step decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and emits the difference. The
    context token keeps decoders that treat the start of a text specially (a leading space)
    consistent; nothing is emitted while the text ends inside a multi-byte character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes (often empty, never a partial character)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """Whatever was held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        seen = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        incomplete = full.endswith(REPLACEMENT_CHAR) or not full.startswith(seen)
        if len(full) <= len(seen) or (incomplete and not final):
            return ""
        delta = full[len(seen):]
        self._prefix, self._read = self._read, len(self._ids)
        self._parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)


def _load_backend(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad files
        raise InvalidParamsError(f"cannot load tokenizer {path}: {err}") from None


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, list):
        return [int(item) for item in value]
    return [] if value is None else [int(value)]


def _chat_template(root: Path, settings: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else ``chat_template`` (a string, or a list of
    named templates of which ``default`` is used)."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# --- building a byte-level BPE tokenizer (GGUF vocabularies) ---------------------------------

# Split patterns of vocabularies whose merges were learned on text pre-split this way.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT}


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                   pre: str | None = None, bos_id: int | None = None,
                   eos_id: int | None = None) -> Backend:
    """A GPT-2-style tokenizer from a vocabulary in llama.cpp's terms.

    tokens: spellings by id; merges: ``"a b"`` pairs, best first; token_types: llama.cpp's
    per-token kinds (CONTROL becomes a special token, USER_DEFINED a plain added token);
    pre: llama.cpp's pre-tokenizer name (unknown names get GPT-2's split);
    bos_id / eos_id: added around the text by ``encode(add_special_tokens=True)``.
    """
    vocab = {byte_level_spelling(token): index for index, token in enumerate(tokens)}
    pairs = [_merge_pair(merge) for merge in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types)
    if bos_id is not None or eos_id is not None:
        backend.post_processor = _bos_eos_template(tokens, bos_id, eos_id)
    return backend


def _merge_pair(merge: str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    return left, right


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = PRE_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _add_special_tokens(backend: Backend, tokens: Sequence[str],
                        token_types: Sequence[int]) -> None:
    # A CONTROL token spelled outside the byte alphabet is a mislabel; it stays a plain token.
    alphabet = _alphabet_chars()
    kinds = list(zip(tokens, token_types, strict=False))
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True) for token, kind in kinds
        if kind == TOKEN_TYPE_CONTROL and set(token) <= alphabet])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False) for token, kind in kinds
        if kind == TOKEN_TYPE_USER_DEFINED])


def _bos_eos_template(tokens: Sequence[str], bos_id: int | None,
                      eos_id: int | None) -> processors.PostProcessor:
    before = [] if bos_id is None else [tokens[bos_id]]
    after = [] if eos_id is None else [tokens[eos_id]]
    single = [*before, "$A", *after]
    second = [f"{token}:1" for token in before] + ["$B:1"] + [f"{token}:1" for token in after]
    specials = [(tokens[i], i) for i in (bos_id, eos_id) if i is not None]
    return processors.TemplateProcessing(single=" ".join(single),
                                         pair=" ".join(single + second), special_tokens=specials)


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are moved, in order, to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + index) for index, byte in enumerate(moved)})
    return table


@functools.cache
def _alphabet_chars() -> frozenset[str]:
    return frozenset(byte_alphabet().values())


def byte_level_spelling(token: str) -> str:
    """``token`` as a byte-level vocabulary spells it (GGUF files store it so already)."""
    if set(token) <= _alphabet_chars():
        return token
    table = byte_alphabet()
    return "".join(table[byte] for byte in token.encode("utf-8"))

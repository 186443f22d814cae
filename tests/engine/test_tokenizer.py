"""Tokenizer and streaming detokenizer, checked against transformers' tokenizer of the same
GGUF file: encode, decode and chat prompts must be identical."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.model import ModelFiles
from kvcake.text import IncrementalDetokenizer, Tokenizer, byte_alphabet

TEXTS = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "   runs   of    spaces   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "",
    "1234567890 and 12 345 6789",
    "3.14159 2.71828 1e-10 -0.5",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "I'm sure you're right, we'll see what they've done",
    "URL: https://example.com/path?q=1&r=2#frag",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "日本語のテキストです。",
    "中文分词测试\uff0c标点符号\uff01",  # full-width comma and exclamation mark
    "한국어 텍스트",
    "café naïve résumé über façade",
    "Ελληνικά και русский текст",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<repo_name>kvcake<file_sep>main.py",
    "a" * 300,
]

MULTI_BYTE_TEXTS = [
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "日本語のテキストです。中文分词测试",
    "mixed: café 🙂 naïve 한국어 ∑∫√ ok",
]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, in 日本語 please 🙂"}],
    [{"role": "system", "content": "Line one\nline two"},
     {"role": "user", "content": "  spaced  "},
     {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(smollm2_tokenizer: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    assert smollm2_tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf_and_round_trips(smollm2_tokenizer: Tokenizer, hf_tokenizer: Any,
                                           text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert smollm2_tokenizer.decode(ids, skip_special_tokens=skip) == expected


def test_special_tokens_are_single_ids(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2_tokenizer.decode(ids) == "user\nhi"


def test_properties_match_hf(smollm2_tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    assert smollm2_tokenizer.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
    assert smollm2_tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert smollm2_tokenizer.vocab_size == len(hf_tokenizer) == 49152
    hf_special = {i for i, token in hf_tokenizer.added_tokens_decoder.items() if token.special}
    assert smollm2_tokenizer.special_ids == hf_special
    assert {0, 1, 2} <= smollm2_tokenizer.special_ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_hf(smollm2_tokenizer: Tokenizer, hf_tokenizer: Any,
                                  messages: list[dict[str, str]],
                                  add_generation_prompt: bool) -> None:
    ours = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


CUSTOM_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\n"
    "  {{- m['role'] | upper }}: {{ m['content'] | trim }}\n{% endfor %}",
]


@pytest.mark.parametrize("template", CUSTOM_TEMPLATES)
def test_jinja_features_render_like_hf(tokenizer_dir: Path, hf_tokenizer: Any,
                                       template: str) -> None:
    messages = CONVERSATIONS[2]
    tokenizer = _with_settings(tokenizer_dir, chat_template=template,
                               bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token)
    ours = tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=True)
    assert ours == theirs


def test_template_refusal_and_absence_are_invalid_params(tokenizer_dir: Path) -> None:
    refusing = _with_settings(tokenizer_dir, chat_template="{{ raise_exception('no tools') }}")
    with pytest.raises(InvalidParamsError, match="no tools"):
        refusing.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidParamsError, match="no chat template"):
        _with_settings(tokenizer_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_jinja_file_and_generation_eos_are_read(tokenizer_dir: Path) -> None:
    (tokenizer_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    (tokenizer_dir / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    tokenizer = _with_settings(tokenizer_dir, chat_template="ignored", eos_token="<|im_end|>")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"
    assert tokenizer.eos_token_ids == (2, 0, 5)


def test_missing_or_broken_files_are_named(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(InvalidParamsError, match=r"cannot load tokenizer .*tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tokenizer_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InvalidParamsError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture
def tokenizer_dir(smollm2_files: ModelFiles, tmp_path: Path) -> Path:
    """A directory holding only a copy of the packaged model's tokenizer.json."""
    path = tmp_path / "tok"
    path.mkdir()
    shutil.copy(smollm2_files.path / "tokenizer.json", path / "tokenizer.json")
    return path


def _with_settings(path: Path, **settings: str) -> Tokenizer:
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return Tokenizer.from_dir(path)


# --- streaming ---------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: Sequence[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.push(token_id) for token_id in ids]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


@pytest.mark.parametrize("text", MULTI_BYTE_TEXTS)
def test_stream_deltas_add_up_to_decode(smollm2_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm2_tokenizer.encode(text)
    # The text really is cut inside characters: some single tokens decode to U+FFFD alone.
    assert any("\ufffd" in smollm2_tokenizer.decode([token_id]) for token_id in ids)
    deltas, streamed = stream(smollm2_tokenizer, ids)
    assert streamed == smollm2_tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert "" in deltas[:-1]  # something was held back until its character completed


@pytest.mark.parametrize("skip", [True, False])
def test_stream_handles_special_tokens(smollm2_tokenizer: Tokenizer, skip: bool) -> None:
    ids = smollm2_tokenizer.encode("<|im_start|>assistant\nSure 👍🏽<|im_end|>\n<|endoftext|>")
    _, streamed = stream(smollm2_tokenizer, ids, skip)
    assert streamed == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)


def test_stream_flushes_an_incomplete_character(smollm2_tokenizer: Tokenizer) -> None:
    ok_id = smollm2_tokenizer.encode("ok ")[0]
    first_piece = smollm2_tokenizer.encode("😀")[0]  # the emoji's first bytes only
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    assert detok.push(ok_id) == "ok"
    assert detok.push(first_piece) == ""
    assert detok.finish() == "\ufffd"
    assert detok.text == smollm2_tokenizer.decode([ok_id, first_piece]) == "ok\ufffd"


def test_stream_passes_invalid_bytes_through(smollm2_tokenizer: Tokenizer) -> None:
    stray = _byte_token(smollm2_tokenizer, 0x80)  # a continuation byte with no lead byte
    ids = [stray, *smollm2_tokenizer.encode("A 日本")]
    deltas, streamed = stream(smollm2_tokenizer, ids)
    assert streamed == smollm2_tokenizer.decode(ids) == "\ufffdA 日本"
    assert deltas[0] == ""


def _byte_token(tokenizer: Tokenizer, byte: int) -> int:
    token_id = tokenizer.token_to_id(byte_alphabet()[byte])
    assert token_id is not None
    return token_id

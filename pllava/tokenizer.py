"""Text <-> token ids for PLLaVA, from a checkpoint's ``tokenizer.json`` (spec 4.3).

The ids come from the checkpoint's own ``tokenizer.json`` run by the ``tokenizers`` library,
exactly as the reference (transformers 4.37 ``LlamaTokenizerFast``, which loads that file
as-is) produced them: BOS prepended once, no EOS, ``<image>`` and a literal ``</s>`` in the
text matched as their special tokens.

Note: transformers 5.x ``LlamaTokenizer`` does *not* use the file's normalizer /
pre-tokenizer / decoder; it rebuilds them (Metaspace, ``prepend_scheme`` from the ``legacy``
flag) and keeps only vocab, merges and post-processor. For a non-legacy file (Metaspace
``prepend_scheme="first"``) both agree; for a legacy-style file (normalizer
``Prepend("▁") + Replace(" ", "▁")``) transformers 5.x puts one "▁" fewer after every added
token, and this module follows the file, i.e. the reference.

:class:`IncrementalDetokenizer` turns generated ids into text pieces for streaming.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _Backend

from .damaged import damage_hint

IMAGE_TOKEN = "<image>"


class TokenizerError(ValueError):
    """A tokenizer folder is missing files or lacks a token PLLaVA needs."""


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config / special_tokens_map: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}{damage_hint(path)}") from exc
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A LLaMA tokenizer backed by ``tokenizers``; see the module docstring for the contract."""

    def __init__(self, backend: _Backend, bos_token: str = "<s>", eos_token: str = "</s>"):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._bos_id = self._require_id(bos_token, "bos")
        self._eos_id = self._require_id(eos_token, "eos")
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        # Ids that decode(skip_special_tokens=True) drops: the added tokens flagged special.
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    def _require_id(self, token: str, what: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"the {what} token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        """Load ``<model_dir>/tokenizer.json``; BOS/EOS names from ``tokenizer_config.json`` or
        ``special_tokens_map.json`` when present (else ``<s>`` / ``</s>``)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            hint = ""
            if (model_dir / "tokenizer.model").is_file():
                hint = (f" (it has only the SentencePiece tokenizer.model; write tokenizer.json from it with "
                        f"transformers: python -c \"from transformers import AutoTokenizer as T; "
                        f"T.from_pretrained('{model_dir}').save_pretrained('{model_dir}')\")")
            raise TokenizerError(
                f"no tokenizer.json at {path}: the checkpoint folder must contain the fast-tokenizer file{hint}"
            )
        try:
            backend = _Backend.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise TokenizerError(f"{path} is not a tokenizer file the tokenizers library reads ({exc})"
                                 f"{damage_hint(path)}") from None
        names = {"bos_token": "<s>", "eos_token": "</s>"}
        # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        for source in ("special_tokens_map.json", "tokenizer_config.json"):
            data = _read_json(model_dir / source)
            for key in names:
                content = _token_content(data.get(key))
                if content:
                    names[key] = content
        return cls(backend, **names)

    # -- ids ---------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def image_token_id(self) -> int:
        token_id = self._backend.token_to_id(IMAGE_TOKEN)
        if token_id is None:
            raise TokenizerError(
                f"the tokenizer has no {IMAGE_TOKEN!r} token; PLLaVA checkpoints add it as a special token "
                "(added_tokens.json: {\"<image>\": 32000})"
            )
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (32001 for PLLaVA: 32000 + ``<image>``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` one BOS in front, never an EOS.

        The file's post-processor (which, for LLaMA, also prepends BOS) is bypassed and BOS is
        added here, so it is never doubled nor missing whatever the post-processor says.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` through the file's decoder (the leading space of the first piece is stripped)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Streams text while ids arrive one at a time: ``push(id) -> new text``, then ``flush()``.

    Invariant: the concatenation of all pieces equals ``tokenizer.decode(all_ids)``, no piece
    ends in the middle of a multi-byte character, and no "▁" space is lost. It holds whenever
    every run of byte-fallback tokens is valid UTF-8 (always the case for text that decodes
    without U+FFFD). If the model emits an invalid byte run, each bad byte comes out as one
    U+FFFD once the run is known to be broken (next token, or ``flush``), and characters
    already complete and streamed stay as they were; the full decode may then differ, because
    ``tokenizers`` turns *every* byte of an invalid run into U+FFFD, including the bytes of
    such characters.

    Technique (as in TGI / vLLM): keep a window ``ids[prefix:]``; ``prefix:read`` is text
    already emitted, ``read:`` is pending. Decode the window and the emitted part; the
    difference is the new text, emitted only if it does not end in U+FFFD (an incomplete
    UTF-8 sequence). Both decodes strip the same leading space (the decoder strips one), so
    the diff keeps the space of a "▁" piece; the very first window starts at the first token,
    whose space the full decode strips too. Skipped special tokens are dropped before they
    enter the window (the decoder never sees them in a full decode either), so a window never
    starts with text-less tokens. The window is trimmed on every emission: O(window) per token.
    """

    # A UTF-8 character needs at most 4 byte tokens; beyond that a pending tail is broken for good.
    _MAX_PENDING = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # ids from the prefix offset on
        self._read = 0  # index in _window of the first id whose text is not emitted yet

    def push(self, token_id: int) -> str:
        """Feed one generated id; return the text it completes (possibly "")."""
        if (self._skip and token_id in self._tok.special_ids) or self._tok.id_to_token(token_id) is None:
            return ""  # text-less: a skipped special token, or a vocab padding row with no token
        self._window.append(token_id)
        return self._emit(final=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever is still pending (e.g. a trailing incomplete byte run, as U+FFFD)."""
        return self._emit(final=True)

    def _decode_alone(self, ids: list[int]) -> str:
        """The text of ``ids`` as if they followed a complete word: decoded behind a one-token
        word whose text is then cut off, so a leading "▁" keeps its space (a decode of ``ids``
        alone would strip it) and no byte already emitted is decoded again."""
        word = self._tok.encode("a", add_bos=False)
        shown = self._tok.decode(word, skip_special_tokens=self._skip)
        text = self._tok.decode(word + ids, skip_special_tokens=self._skip)
        return text[len(shown):] if shown and text.startswith(shown) else self._tok.decode(ids, self._skip)

    def _emit(self, final: bool) -> str:
        if self._read >= len(self._window):
            return ""
        decode = self._tok.decode
        prefix_text = decode(self._window[: self._read], skip_special_tokens=self._skip) if self._read else ""
        text = decode(self._window, skip_special_tokens=self._skip)
        pending = len(self._window) - self._read
        if not final and text.endswith("\ufffd") and pending < self._MAX_PENDING:
            return ""  # incomplete character: wait for its next byte
        if text.startswith(prefix_text):
            new = text[len(prefix_text):]
        else:  # an invalid byte run rewrote text already emitted (see the class docstring)
            new = self._decode_alone(self._window[self._read:])
        # Slide: the ids just emitted become the new prefix; older ones are dropped.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return new

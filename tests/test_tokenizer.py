"""Tokenizer ids against transformers, streaming detokenization, and the tiny tokenizer builder."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import normalizers

from pllava.prompt import DEFAULT_QUESTION, MINDSPORE_QUESTION, build_prompt, expand_image_tokens
from pllava.tiny_tokenizer import build_tiny_tokenizer
from pllava.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

REPO = Path(__file__).resolve().parents[1]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
BYTE_IDS = range(3, 259)  # <0x00>..<0xFF>

TEXTS = [
    "Hello world",
    "A man is cooking onions in a pan.",
    "café naïve crème brûlée, jalapeño, Über",
    "中文字幕 and 日本語 😀🎉 mixed",
    "  two leading spaces, trailing space ",
    "line one\nline two\n\n\tindented\r\nend",
    "emoji at end 👍🏽",
    "a  b   c    d",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tok")
    info = build_tiny_tokenizer(out, vocab_size=512)
    return out, info


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir[0])


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir[0]))


def all_prompts():
    return TEXTS + [
        build_prompt(DEFAULT_QUESTION),  # the full "plain" demo prompt with <image>
        build_prompt(DEFAULT_QUESTION, "simple"),
        build_prompt("Describe it.", "recaption"),
        build_prompt(MINDSPORE_QUESTION, "mindspore"),  # holds a literal "</s>"
        build_prompt("Qu'est-ce que c'est ? 这是什么？🙂"),
        "x<image>y",
    ]


# -- ids against transformers ------------------------------------------------------------


def test_encode_matches_transformers(tok, hf):
    from transformers import LlamaTokenizerFast

    assert type(hf).__name__ == "LlamaTokenizer"
    fast = LlamaTokenizerFast.from_pretrained(str(Path(hf.name_or_path)))
    for text in all_prompts():
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ids == fast.encode(text), text
        assert ids == hf.encode(text, add_special_tokens=True), text
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_bos_once_and_no_eos(tok, tiny_dir):
    ids = tok.encode("Hello world")
    assert ids[0] == 1 and ids[1] != 1 and ids[-1] != tok.eos_token_id
    assert tok.encode("Hello world", add_bos=False) == ids[1:]
    # tokenizer.json's own post-processor adds BOS too; encode() must not double it...
    raw = RawTokenizer.from_file(str(tiny_dir[0] / "tokenizer.json"))
    assert raw.encode("Hello world").ids == ids
    # ...nor lose it when a tokenizer.json has no post-processor at all.
    raw.post_processor = None
    assert Tokenizer(raw).encode("Hello world") == ids


def test_special_ids(tok, tiny_dir):
    _, info = tiny_dir
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.image_token_id == info["image_token_id"] == 512 == info["base_vocab_size"]
    assert tok.vocab_size == info["vocab_size"] == 513
    assert tok.id_to_token(0) == "<unk>" and tok.id_to_token(3) == "<0x00>" and tok.id_to_token(258) == "<0xFF>"


def test_image_token_is_one_id(tok):
    for text in ("<image>", "USER:<image>  USER:", "x<image>y", build_prompt(DEFAULT_QUESTION)):
        ids = tok.encode(text)
        assert ids.count(tok.image_token_id) == 1, text
        assert "<" not in [tok.id_to_token(i) for i in ids], text  # never split into characters


def test_space_after_image_token(tok):
    # Metaspace(prepend_scheme="first"): the text after an added token gets no extra "▁";
    # the two spaces after <image> in the demo prompt become two "▁".
    ids = tok.encode("USER:<image>  USER:", add_bos=False)
    k = ids.index(tok.image_token_id)
    after = [tok.id_to_token(i) for i in ids[k + 1:]]
    assert "".join(after) == "▁▁USER:"
    assert tok.decode(ids, skip_special_tokens=False) == "USER:<image>  USER:"


def test_literal_eos_in_mindspore_prompt_is_the_special_token(tok):
    ids = tok.encode(build_prompt(MINDSPORE_QUESTION, "mindspore"))
    assert ids.count(tok.eos_token_id) == 1
    assert ids.count(tok.image_token_id) == 1


def test_prompt_to_expanded_ids(tok):
    ids = tok.encode(build_prompt(DEFAULT_QUESTION))
    expanded, start = expand_image_tokens(ids, tok.image_token_id, 576)
    assert start == ids.index(tok.image_token_id)
    assert len(expanded) == len(ids) + 575
    assert expanded[:start] == ids[:start] and expanded[start + 576:] == ids[start + 1:]


def test_decode_roundtrip_and_matches_transformers(tok, hf):
    for text in all_prompts():
        ids = tok.encode(text)
        full = tok.decode(ids, skip_special_tokens=False)
        assert full == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):  # the decoder strips the first piece's space, as HF does
            assert full == "<s> " + text if text else full == "<s>"
            if "<image>" not in text and "</s>" not in text:
                assert tok.decode(ids) == text


def test_missing_files_and_tokens(tmp_path, tiny_dir):
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")  # a folder saved without the fast file
    with pytest.raises(TokenizerError, match=r"only the SentencePiece tokenizer.model; write tokenizer.json from it"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    raw = RawTokenizer.from_file(str(tiny_dir[0] / "tokenizer.json"))
    data = json.loads(raw.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    no_image = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="<image>"):
        _ = no_image.image_token_id


def test_special_token_names_from_config_files(tmp_path, tiny_dir):
    shutil.copy(tiny_dir[0] / "tokenizer.json", tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": {"content": "<unk>", "lstrip": False}})
    )
    assert Tokenizer.from_pretrained(tmp_path).eos_token_id == 0  # read from special_tokens_map
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_id == 2  # tokenizer_config wins
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="<nope>"):
        Tokenizer.from_pretrained(tmp_path)


def test_legacy_style_file_is_followed_as_is(tmp_path, tiny_dir):
    """A legacy tokenizer.json (normalizer Prepend+Replace) prepends "▁" after every added
    token; transformers 4.x used the file as-is, and so do we."""
    raw = RawTokenizer.from_file(str(tiny_dir[0] / "tokenizer.json"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = None
    raw.save(str(tmp_path / "tokenizer.json"))
    legacy = Tokenizer.from_pretrained(tmp_path)
    text = build_prompt(DEFAULT_QUESTION)
    assert legacy.encode(text) == raw.encode(text).ids
    ids = legacy.encode("USER:<image>  USER:", add_bos=False)
    k = ids.index(legacy.image_token_id)
    assert "".join(legacy.id_to_token(i) for i in ids[k + 1:]) == "▁▁▁USER:"


# -- incremental detokenization ------------------------------------------------------------


def stream(tok, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_stream_equals_full_decode(tok):
    used_bytes = False
    for text in all_prompts():
        for add_bos in (True, False):
            ids = tok.encode(text, add_bos=add_bos)
            used_bytes |= any(i in BYTE_IDS for i in ids)
            for skip in (True, False):
                pieces = stream(tok, ids, skip)
                assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), (text, skip)
                assert not any("\ufffd" in p for p in pieces), (text, pieces)
    assert used_bytes  # the texts do exercise byte fallback


def test_stream_of_generated_text_with_specials_in_the_middle(tok, hf):
    ids = (
        tok.encode("The cook says “voilà”", add_bos=False)
        + [tok.eos_token_id, tok.image_token_id]
        + tok.encode(" 好吃！🍜\n", add_bos=False)
        + [tok.eos_token_id]
    )
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == "The cook says “voilà” 好吃！🍜\n"


def test_multibyte_char_is_emitted_once_complete(tok):
    ids = tok.encode("文", add_bos=False)
    tokens = [tok.id_to_token(i) for i in ids]
    assert tokens == ["▁", "<0xE6>", "<0x96>", "<0x87>"]  # byte fallback: 3 byte tokens
    assert stream(tok, ids) == ["", "", "", "文", ""]
    ids = tok.encode("a 😀", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁a", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert stream(tok, ids) == ["a", " ", "", "", "", "😀", ""]


def test_leading_space_kept_mid_stream_and_stripped_at_start(tok):
    ids = tok.encode("the cat", add_bos=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁the", "▁c", "at"]
    # The first piece loses its space (as in a full decode); "▁c" mid-stream keeps it.
    assert stream(tok, ids) == ["the", " c", "at", ""]
    # After BOS (skipped) the first text piece is still the start of the text.
    assert stream(tok, tok.encode("the cat")) == ["", "the", " c", "at", ""]


def test_flush_emits_an_incomplete_tail(tok):
    ids = tok.encode("ok 文", add_bos=False)[:-1]  # cut the last byte of 文
    pieces = stream(tok, ids)
    assert pieces[-1] != "" and "\ufffd" in pieces[-1]
    assert "".join(pieces) == tok.decode(ids)


def test_lone_invalid_byte_mid_stream(tok):
    e6 = tok.token_to_id("<0xE6>")
    ids = tok.encode("ok", add_bos=False) + [e6] + tok.encode(" fine", add_bos=False)
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "ok\ufffd fine"


def test_a_broken_byte_run_after_a_streamed_character_costs_one_fffd_per_bad_byte(tok):
    """A character made of byte tokens, streamed, then a run that breaks: the character stays
    and only the bad bytes become U+FFFD (the window's full decode turns the whole run into
    U+FFFD, and slicing it used to add one per byte of the character already sent)."""
    def byte_ids(data: bytes) -> list[int]:
        return [tok.token_to_id(f"<0x{b:02X}>") for b in data]

    the = tok.encode("the", add_bos=False)
    cut = the + byte_ids("€".encode()) + byte_ids("€".encode()[:2])  # ends mid-character (max_new_tokens)
    assert "".join(stream(tok, cut)) == "the€\ufffd\ufffd"
    stray = the + byte_ids("😀".encode()) + byte_ids(b"\x80") + tok.encode(" the", add_bos=False)
    assert "".join(stream(tok, stray)) == "the😀\ufffd the"


def test_random_texts_stream_exactly(tok):
    rng = random.Random(1234)
    alphabet = list("abcdefghij XYZ.,!?") + ["  ", "\n", "\t", "é", "ï", "中", "文", "字", "😀", "👍🏽", "ü", "ñ", "€"]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text, add_bos=rng.random() < 0.5)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), text


def test_window_stays_small(tok):
    """O(window) per token: no decode call sees more than a handful of ids."""
    sizes = []

    class Spy:
        special_ids = tok.special_ids

        def id_to_token(self, token_id):
            return tok.id_to_token(token_id)

        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("The video shows a cook. 中文 😀 " * 60, add_bos=False)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(Spy())
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert max(sizes) <= 8


def test_vocab_padding_ids_keep_spaces(tok):
    """Ids past the tokenizer's vocab (the model pads its vocab to a multiple of 64) decode to
    nothing and must not cost the next word its leading space."""
    pad = tok.vocab_size + 5
    assert tok.id_to_token(pad) is None
    ids = tok.encode("the cook adds salt", add_bos=False)
    mixed = [ids[0], pad, *ids[1:2], pad, pad, *ids[2:]]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in mixed) + detok.flush()
    assert text == tok.decode(ids) == "the cook adds salt"


# -- the tiny tokenizer itself ---------------------------------------------------------------


def test_tiny_tokenizer_layout(tiny_dir, hf):
    out, info = tiny_dir
    assert info == {
        "base_vocab_size": 512, "image_token_id": 512, "vocab_size": 513,
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "pad_token_id": 0,
    }
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and model["unk_token"] == "<unk>"
    assert len(model["vocab"]) == 512 and len(model["merges"]) > 50
    vocab = model["vocab"]
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>")] == [0, 1, 2, 3, 13, 258]
    added = {t["content"]: (t["id"], t["special"], t["normalized"]) for t in data["added_tokens"]}
    assert added == {"<unk>": (0, True, False), "<s>": (1, True, False), "</s>": (2, True, False),
                     "<image>": (512, True, False)}
    # The same pipeline as the one transformers 5.x LlamaTokenizer builds.
    backend = json.loads(hf.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert data[part] == backend[part], part
    assert data["pre_tokenizer"]["prepend_scheme"] == "first"

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["model_max_length"] == 4096
    assert json.loads((out / "added_tokens.json").read_text()) == {"<image>": 512}
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in smap.items()} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def test_tiny_tokenizer_other_size(tmp_path, tok):
    info = build_tiny_tokenizer(tmp_path, vocab_size=400)
    small = Tokenizer.from_pretrained(tmp_path)
    assert info["image_token_id"] == small.image_token_id == 400 and small.vocab_size == 401
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(tmp_path / "x", vocab_size=300)
    with pytest.raises(ValueError, match="too large"):
        build_tiny_tokenizer(tmp_path / "y", vocab_size=5000)


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_dir):
    build_tiny_tokenizer(tmp_path / "a")
    build_tiny_tokenizer(tmp_path / "b")
    # A separate process, with a different hash seed, must write the same bytes too.
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    code = "import sys; from pllava.tiny_tokenizer import build_tiny_tokenizer; build_tiny_tokenizer(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env, cwd=REPO)
    for name in FILES:
        ref = (tiny_dir[0] / name).read_bytes()
        for d in "abc":
            assert (tmp_path / d / name).read_bytes() == ref, (d, name)

"""A tiny LLaMA-style tokenizer folder for tests: same file set and pipeline as the real one.

The real PLLaVA / llava-v1.6-vicuna checkpoints ship a SentencePiece-BPE LLaMA tokenizer
(spec 4.3): ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte tokens ``<0x00>``..``<0xFF>`` at
ids 3..258, then the learned pieces, then ``<image>`` as an added special token right after
the base vocabulary. :func:`build_tiny_tokenizer` writes a folder with the same layout and the
same ``tokenizers`` pipeline that transformers 5.x ``LlamaTokenizer`` builds (non-legacy):

- model: ``BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>")``;
- normalizer: none;
- pre-tokenizer: ``Metaspace("▁", prepend_scheme="first", split=False)``: spaces become "▁"
  and a "▁" is prepended to the first text segment only (not after added tokens);
- decoder: ``Replace("▁", " ") -> ByteFallback -> Fuse -> Strip(" ", left=1)``;
- post-processor: ``TemplateProcessing("<s> $A")``: BOS prepended, no EOS.

The merges are learned by ``tokenizers``' ``BpeTrainer`` from :data:`CORPUS`, which covers
English plus a few accented Latin letters (é, ï, ü, ñ) and one CJK character (中), so those
become ordinary vocabulary pieces; every other character (other CJK, emoji, "\\n", tabs)
falls back to byte tokens, exactly like the real vocabulary does for rare characters.

The build is deterministic (no randomness; the trainer's output only depends on its input),
so two builds write byte-identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, IMAGE = "<unk>", "<s>", "</s>", "<image>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
NUM_RESERVED = 3 + len(BYTE_TOKENS)  # <unk>, <s>, </s>, then the byte tokens: ids 0..258

# Written for this project. Lines are training "sentences"; they hold no "\n", so newlines
# are encoded with the <0x0A> byte token, as in the LLaMA vocabulary.
CORPUS = """\
The video shows a person cooking in a small kitchen. First, the person washes the vegetables in the sink and puts them on a wooden board.
Then the person cuts the onions, the carrots and the tomatoes into small pieces with a large knife, and puts them into a hot pan with some oil.
The camera stays on the pan for a while. Steam rises from the pan, and the person stirs the food with a spoon. At the end, the dish is served on a white plate.
In another video, a woman is practicing yoga on a mat in a bright room. She stands still, raises her arms above her head, and bends slowly to the left and to the right.
She then sits down, stretches her legs and holds the pose for several seconds. The background is a plain wall with a window, and the light is soft.
A man is walking his dog in a park. The dog runs after a ball, brings it back, and the man throws it again. There are trees, a path, and a few people on the benches.
USER: Describe the video in details. ASSISTANT: The video shows a street at night with cars, lights, and people walking on the side of the road.
You are a powerful Video Magic ChatBot, a large vision-language assistant. You are able to understand the video content that the user provides.
Make use of the information in a proper way to be competent for the job. Follow the user's instruction. Be critical yet believe in yourself.
What is shown in this video? Describe the background, characters and the actions in the provided video. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10.
At the café, a naïve visitor orders a crème brûlée and a jalapeño toast; the señor smiles. Über cool, déjà vu, résumé, façade, coöperate.
The sign says 中 in red letters, and the children count: one, two, three, four, five, six, seven, eight, nine, ten (0123456789).
Questions? Answers! "Quotes", 'single quotes', [brackets], {braces}, <angles>, a+b=c, 50% off, #tag, @user, $5, & more; end/start - dash _ under * star | bar ~ tilde.
"""

# Characters the trainer must know even if the corpus changes: printable ASCII.
_INITIAL_ALPHABET = [chr(c) for c in range(0x21, 0x7F)]


def _train_pieces(vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn SentencePiece-style pieces ("▁word") with BpeTrainer; return (pieces, merges)."""
    learned = vocab_size - NUM_RESERVED
    trainer_tok = Tokenizer(models.BPE())
    # Split on "▁" for training so that no piece spans a word boundary, like SentencePiece.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=_INITIAL_ALPHABET + ["▁"],
    )
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    state = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].__getitem__)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    if len(pieces) != learned:
        raise ValueError(
            f"vocab_size={vocab_size} is too large for the built-in corpus: "
            f"at most {NUM_RESERVED + len(pieces)} base tokens can be learned"
        )
    return pieces, merges


def build_backend(vocab_size: int = 512) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of the tiny vocabulary (base ``vocab_size`` plus ``<image>``)."""
    if vocab_size < NUM_RESERVED + len(_INITIAL_ALPHABET) + 1 + 32:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need room for 259 reserved tokens, the alphabet and merges"
        )
    pieces, merges = _train_pieces(vocab_size)
    vocab = {tok: i for i, tok in enumerate([UNK, BOS, EOS, *BYTE_TOKENS, *pieces])}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    tok.add_special_tokens([AddedToken(IMAGE, normalized=False, special=True)])
    return tok


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> dict[str, int]:
    """Write a LLaMA-style tokenizer folder with ``vocab_size`` base tokens plus ``<image>``.

    Files: ``tokenizer.json``, ``tokenizer_config.json`` (``LlamaTokenizer``, add_bos_token
    true, add_eos_token false, legacy false), ``special_tokens_map.json`` and
    ``added_tokens.json`` (``{"<image>": vocab_size}``). Deterministic and fast (well under 1 s).
    ``vocab_size`` must lie between 386 and about 1050 (what the built-in corpus can teach).

    Returns ``{"base_vocab_size", "image_token_id", "vocab_size", "bos_token_id",
    "eos_token_id", "unk_token_id", "pad_token_id"}``; a model over this tokenizer needs an
    embedding table of ``vocab_size`` (= base + 1) rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_backend(vocab_size)
    image_id = tok.token_to_id(IMAGE)
    if image_id != vocab_size:
        raise RuntimeError(f"<image> got id {image_id}, expected {vocab_size}")

    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): _added_token_entry(t) for i, t in ((0, UNK), (1, BOS), (2, EOS), (image_id, IMAGE))
            },
            **special,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": 4096,
            "padding_side": "left",
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
         for k, v in special.items()},
    )
    _write_json(out / "added_tokens.json", {IMAGE: image_id})
    return {
        "base_vocab_size": vocab_size,
        "image_token_id": image_id,
        "vocab_size": vocab_size + 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "pad_token_id": 0,
    }

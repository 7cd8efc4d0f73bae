"""The two halves of PLLaVA, each loadable on its own so a server holds only its weights.

``PllavaVision``: frames -> CLIP -> projector + 3-D pooling -> visual tokens.
``PllavaLanguage``: prompt ids + visual tokens -> merged embeddings -> LLaMA prefill/decode.
"""
from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import weights as W
from .config import PllavaConfig
from .cpu_kernels import copy_cache_rows_op, full_attention_op, half_linear_op, half_linear_tiles
from .layers import Backend, half_linears, to_tensor
from .llama import LlamaForCausalLM, block_key_positions, half_weights_allowed
from .prefix_reuse import SlotPrefixes
from .projector import PllavaMultiModalProjector
from .shapes import Chunk, DecodeCost, ShapePlan, smallest_at_least
from .vision import CLIPVisionTower

_CLIP_LAYER = re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")


def build_no_init(factory):
    """Build a cell without random-initialising weights that the loader overwrites anyway."""
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        cell = factory()
    return cell


class PllavaVision(nn.Cell):
    """Vision tower + projector, named as in the checkpoint (``vision_tower.*``,
    ``multi_modal_projector.*``). ``half_dtype``: the half precision (float16 / bfloat16) the
    checkpoint stores every projection in (``from_pretrained`` reads it); where the CPU has
    AMX tiles their weights stay so and the project's kernel multiplies by them in float32 (as
    the language model's, :func:`pllava.llama.half_weights_allowed`): the same values, half the
    bytes. Without the tiles that kernel is no faster than MindSpore's matmul for the tower's
    1154-row calls (fc1 9.9 against 8.3 ms; with its panels asked for further ahead, 4 frames
    encoded in 0.41-0.46 s through it against 0.40-0.43 through MindSpore's), so the weights
    are widened to float32 there."""

    def __init__(self, cfg: PllavaConfig, backend: Backend = Backend(), jit: bool = True, half_dtype=None):
        super().__init__()
        self.cfg = cfg
        self.dtype = backend.dtype
        linear = None
        if half_dtype is not None and half_weights_allowed(backend) and half_linear_tiles():
            linear = half_linears(half_dtype, half_linear_op())
        attention_op = full_attention_op() if backend.cpu_kernels and cfg.vision.head_dim % 16 == 0 else None
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used, backend.dtype, linear, attention_op)
        self.multi_modal_projector = PllavaMultiModalProjector(
            cfg.vision.hidden_size, cfg.text.hidden_size, cfg.frame_shape, backend.dtype, linear)
        self._frames = ms.jit(self.frame_activations) if jit else self.frame_activations

    #: Frames per compiled call. The tower and the projector's per-frame part run as one
    #: compiled graph per frame count, so every call takes this many frames, and an odd last
    #: frame runs alone (a second, one-frame graph). Measured on the benchmark CLIP (512x8 @336
    #: px, 2 cores), the tower alone: compiled, 0.26 s per frame alone, 0.18-0.22 in calls of
    #: 2, 4 or 8 (eager, 4 frames a call: 0.43); the 2-frame graph compiles in ~2 s, the
    #: 4-frame one in 7-19 s. 16 frames through tower and projector: eager 7 s, compiled 3.0.
    frames_per_call = 2

    def frame_activations(self, pixel_values):
        """(n, 3, S, S) pixels -> (n, G*G, Dt) CLIP features at ``vision_feature_layer``
        through the projector's linear_1 and GELU (traced by ``mindspore.jit``)."""
        return self.multi_modal_projector.per_frame(self.vision_tower(pixel_values))

    def encode_frames(self, pixel_values: np.ndarray) -> Tensor:
        """(N, 3, S, S) fp32 pixels -> (N, G*G, Dv) CLIP features at ``vision_feature_layer``,
        run eagerly: a check of the tower alone (serving goes through :meth:`encode_videos`)."""
        return self.vision_tower(to_tensor(pixel_values).astype(self.dtype))

    def _activations(self, pixel_values: np.ndarray) -> Tensor:
        step = self.frames_per_call
        parts = [self._frames(to_tensor(pixel_values[i:i + step]).astype(self.dtype))
                 for i in range(0, len(pixel_values), step)]
        return parts[0] if len(parts) == 1 else ops.concat(parts, 0)

    def warm_up(self) -> int:
        """Compile the per-frame graphs (a full call and a lone frame) before the first
        request; returns how many were run."""
        size = self.cfg.vision.image_size
        counts = sorted({1, self.frames_per_call})
        for n in counts:
            self._frames(to_tensor(np.zeros((n, 3, size, size), np.float32)).astype(self.dtype)).asnumpy()
        return len(counts)

    def project(self, features: Tensor, cfg: PllavaConfig | None = None) -> Tensor:
        """Features of one video's frames (T, G*G, Dv) -> (num_visual_tokens, Dt) in the model
        dtype. ``cfg`` overrides the frame count and pooled shape for this video."""
        cfg = cfg or self.cfg
        return self.multi_modal_projector(features, cfg.num_frames, cfg.pooling_shape)

    def encode_videos(self, videos: Sequence[np.ndarray],
                      cfgs: Sequence[PllavaConfig] | None = None) -> list[np.ndarray]:
        """Several videos' pixels -> ONE vision-tower call over all their frames, then
        per-video projection and pooling (each with its own ``cfgs[i]`` if given).
        Returns fp32 (num_visual_tokens, Dt) arrays (exact for any model dtype)."""
        cfgs = cfgs or [self.cfg] * len(videos)
        activations = self._activations(np.concatenate(list(videos), axis=0))
        out, start = [], 0
        for frames, cfg in zip(videos, cfgs):
            n = len(frames)
            tokens = self.multi_modal_projector.finish(activations[start:start + n], cfg.num_frames, cfg.pooling_shape)
            out.append(tokens.astype(ms.float32).asnumpy())
            start += n
        return out

    def load(self, source: str | Path, lora_alpha: float = W.DEFAULT_LORA_ALPHA) -> "PllavaVision":
        used = self.cfg.vision_layers_used

        def unused_layer(name: str) -> bool:
            m = _CLIP_LAYER.match(name)
            return m is not None and int(m.group(1)) >= used

        W.load_into(self, W.iter_weights(source, [W.VISION], lora_alpha), ignore=unused_layer)
        return self

    @classmethod
    def from_pretrained(cls, source: str | Path, cfg: PllavaConfig, backend: Backend = Backend(),
                        lora_alpha: float = W.DEFAULT_LORA_ALPHA, jit: bool = True) -> "PllavaVision":
        half_dtype = _HALF_DTYPES.get(W.stored_vision_dtype(source))
        return build_no_init(lambda: cls(cfg, backend, jit, half_dtype)).load(source, lora_alpha)


_HALF_DTYPES = {"F16": ms.float16, "BF16": ms.bfloat16}


def stored_half_weights(source: str | Path) -> tuple[tuple[str, ms.dtype], ...]:
    """(kind, half dtype) of each language-model projection kind (``q_proj``...``lm_head``)
    that a checkpoint stores in float16 / bfloat16 (:func:`pllava.weights.stored_weight_dtypes`:
    no LoRA), sorted; () for float32 checkpoints and .ckpt files."""
    stored = W.stored_weight_dtypes(source)
    return tuple(sorted((kind, _HALF_DTYPES[d]) for kind, d in stored.items() if d in _HALF_DTYPES))


class PllavaLanguage:
    """LLaMA with a static KV cache of ``num_slots`` sequences of ``max_len`` tokens, and
    compiled prefill / decode steps at the shapes of a ``ShapePlan``. Thin host-side
    wrapper: numpy in, numpy out. ``half_weights``: the projections the checkpoint stores in
    half precision (:func:`stored_half_weights`; ``from_pretrained`` reads it), kept so on
    the CPU (``pllava.llama.half_weights_allowed``)."""

    def __init__(self, cfg: PllavaConfig, backend: Backend = Backend(), num_slots: int = 1,
                 max_len: int | None = None, jit: bool = True, half_weights: tuple = (), **plan):
        max_len = max_len or cfg.text.max_position_embeddings
        if max_len > cfg.text.max_position_embeddings:
            raise ValueError(f"max context {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.text.max_position_embeddings}")
        self.cfg = cfg
        self.backend = backend
        self.num_slots = num_slots
        self.max_len = max_len
        self.plan = ShapePlan(num_slots, max_len, **plan)
        self.lm = build_no_init(lambda: LlamaForCausalLM(cfg.text, backend, num_slots, max_len,
                                                         blocks=self.plan.context_buckets, half_weights=half_weights))
        self.plan = replace(self.plan, attention_in_place=self.lm.kernel_attention)
        self._prefill = ms.jit(self.lm.prefill) if jit else self.lm.prefill
        self._decode = ms.jit(self.lm.decode) if jit else self.lm.decode
        self._contexts = {c: to_tensor(block_key_positions(self.lm.blocks, c)) for c in self.plan.context_buckets}
        self.decode_cost = estimate_decode_cost(self.plan, cfg, backend, live_rows=self.lm.kernel_attention,
                                                half_weights=self.lm.half_weights_kept)
        # The CPU kernels read each sequence's own positions whatever the bucket: one decode
        # graph per batch bucket and one prefill graph per chunk size (all at max_len), rather
        # than one per context bucket too.
        self.decode_contexts = (max_len,) if self.lm.kernel_attention else self.plan.context_buckets
        self.graph_seconds: dict[tuple[str, int, int], float] = {}  # prefill graphs timed at warm-up
        # One compiled step for a prefill chunk and the running streams' decode rows (the
        # CPU kernels only): the chunk sizes the engine takes while streams decode.
        self._mixed = ms.jit(self.lm.mixed) if jit else self.lm.mixed
        self._mixed_part = ms.jit(self.lm.mixed_part) if jit else self.lm.mixed_part
        self.mixed_sizes = (tuple(s for s in self.plan.chunk_sizes(0) if s <= MIXED_CHUNK_MAX)
                            if self.lm.kernel_attention and num_slots > 1 else ())
        #: the layers [first, last) of each step a shortest chunk beside decode rows may also run
        #: in (one compiled step each; empty: whole chunks only): the streams then wait a decode
        #: step and a share of the chunk per token, where late in a long prompt the whole
        #: chunk's step is the longest wait the pacer can choose
        self.chunk_layer_parts = (layer_parts(cfg.text.num_hidden_layers, self.plan.small_chunk_parts)
                                  if self.mixed_sizes and self.plan.small_chunk_parts > 1 else ())
        #: which prompt ids each slot's leading rows hold (every write below updates it)
        self.prefixes = SlotPrefixes(num_slots)
        self._copy_rows = copy_cache_rows_op() if self.lm.kernel_attention and num_slots > 1 else None
        #: whether decode rows whose slots hold the same leading text read it from one slot (the
        #: CPU decode kernel; their slots go as (slot, prefix slot, prefix rows) rows)
        self.share_prefixes = self.lm.kernel_attention

    def load(self, source: str | Path, lora_alpha: float = W.DEFAULT_LORA_ALPHA) -> "PllavaLanguage":
        tied = self.cfg.text.tie_word_embeddings
        W.load_into(self.lm, W.iter_weights(source, [W.LANGUAGE], lora_alpha), prefix="language_model.",
                    skip=lambda name: ".k_cache." in name or ".v_cache." in name,
                    ignore=lambda name: tied and name == "language_model.lm_head.weight")
        return self

    @classmethod
    def from_pretrained(cls, source: str | Path, cfg: PllavaConfig, backend: Backend = Backend(),
                        lora_alpha: float = W.DEFAULT_LORA_ALPHA, **kwargs) -> "PllavaLanguage":
        kwargs.setdefault("half_weights", stored_half_weights(source))
        return cls(cfg, backend, **kwargs).load(source, lora_alpha)

    @property
    def vocab_size(self) -> int:
        return self.cfg.text.vocab_size

    def merge_embeddings(self, input_ids: Sequence[int], visual: np.ndarray | None) -> np.ndarray:
        """Text embeddings with the single ``<image>`` id replaced by the visual tokens:
        (1, L - 1 + V, D) float32 (exact for every model dtype). Text token j lands at
        j + (V - 1) if it follows the image. Host memory: each prefill chunk sends its own
        rows, so admitting a long prompt runs no device op over all of it (a 16-frame
        prompt's merge as one took ~50 ms, inside the step the running streams waited on)."""
        ids = np.asarray(input_ids, dtype=np.int32)
        image_at = np.flatnonzero(ids == self.cfg.image_token_index)
        if visual is None:
            if len(image_at):
                raise ValueError("the prompt has an <image> token but no visual tokens were given")
            return self._embed_rows(ids)[None]
        if len(image_at) != 1:
            raise ValueError(f"the prompt must contain exactly one <image> token, found {len(image_at)}")
        i = int(image_at[0])
        text = self._embed_rows(np.where(ids == self.cfg.image_token_index, self.cfg.pad_token_id, ids))
        return np.concatenate((text[:i], np.asarray(visual, dtype=np.float32), text[i + 1:]), 0)[None]

    def _embed_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.lm.embed(to_tensor(ids)).astype(ms.float32).asnumpy()

    def prefill_chunk(self, slot: int, embeds, chunk: Chunk, all_logits: bool = False) -> np.ndarray:
        """Run prompt positions [chunk.start, chunk.start + chunk.length) of ``embeds``
        (1, L, D: ``merge_embeddings``' array, or a Tensor) into cache ``slot``. Returns fp32
        logits (1, vocab) at the chunk's last position, or (chunk.length, vocab) at each of
        its positions with ``all_logits``."""
        piece, positions = _chunk_rows(embeds, chunk, self.lm.dtype)
        self.prefixes.written(slot, chunk.start)
        index = np.arange(chunk.size) if all_logits else np.array([chunk.length - 1])
        logits = self._prefill(piece, positions, to_tensor(np.array([slot], dtype=np.int32)),
                               self._graph_context(chunk.context), to_tensor(index.astype(np.int32)))
        out = logits.asnumpy()
        return out[:chunk.length] if all_logits else out

    def prefill_chunk_and_decode(self, slot: int, embeds, chunk: Chunk, tokens: np.ndarray,
                                 positions: np.ndarray, slots: np.ndarray,
                                 batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``prefill_chunk`` into ``slot`` and ``decode`` of the sequences (tokens, positions,
        slots: (n,)) as ONE compiled step (``chunk.size`` in ``mixed_sizes``): the weights are
        read once for both. The decode rows go at their batch bucket as :meth:`_rows_at_batch`
        puts them (``batch``: that bucket, for a step with no sequence). -> (chunk logits
        (1, vocab), decode logits (n, vocab))."""
        piece, where_chunk = _chunk_rows(embeds, chunk, self.lm.dtype)
        inputs, pick = self._mixed_inputs(slot, chunk, tokens, positions, slots, batch)
        logits = self._mixed(piece, where_chunk, *inputs).asnumpy()
        return logits[:1], logits[1:][pick]

    def prefill_chunk_part_and_decode(self, slot: int, embeds, chunk: Chunk, part: int, hidden, tokens: np.ndarray,
                                      positions: np.ndarray, slots: np.ndarray, batch: int | None = None) -> tuple:
        """Part ``part`` of :attr:`chunk_layer_parts` of a chunk beside ``decode`` of the
        sequences, as ONE compiled step: the chunk's rows through that part's layers (from
        ``embeds`` at part 0, else from ``hidden``, the previous part's output), the decode rows
        through every layer. -> (the chunk's rows after the part: the next part's ``hidden``;
        the chunk logits (1, vocab) after the last part, else None; decode logits (n, vocab))."""
        if not 0 <= part < len(self.chunk_layer_parts) or chunk.size != min(self.mixed_sizes):
            raise ValueError(f"no compiled step for part {part} of a {chunk.size}-position chunk")
        first, last = self.chunk_layer_parts[part]
        if part == 0:
            rows, where_chunk = _chunk_rows(embeds, chunk, self.lm.dtype)
        else:
            rows, where_chunk = hidden, _chunk_positions(chunk)
        inputs, pick = self._mixed_inputs(slot, chunk, tokens, positions, slots, batch)
        hidden, logits = self._mixed_part(rows, where_chunk, *inputs, first, last)
        logits = logits.asnumpy()
        return hidden, logits[:1] if last == self.cfg.text.num_hidden_layers else None, logits[1:][pick]

    def _mixed_inputs(self, slot: int, chunk: Chunk, tokens, positions, slots, batch: int | None) -> tuple:
        """A mixed step's inputs after the chunk's rows and positions (the chunk's slot, the
        decode rows of :meth:`_rows_at_batch`, the logit rows: the chunk's last, then each
        decode row's), and where each sequence's logits are among the decode rows'; records
        what the step writes."""
        self._written(slots, positions)
        self.prefixes.written(slot, chunk.start)
        batch = self.plan.batch_bucket(max(len(tokens), 1)) if batch is None else batch
        feed, where, table, pick = self._rows_at_batch(tokens, positions, slots, batch)
        index = np.concatenate(([chunk.length - 1], chunk.size + np.arange(batch))).astype(np.int32)
        return (to_tensor(np.array([slot], dtype=np.int32)), feed, where, table, to_tensor(index)), pick

    def _rows_at_batch(self, tokens, positions, slots, batch: int) -> tuple:
        """The ``batch`` decode rows of a decode or mixed step: at every slot's batch in slot
        order (the step then attends over the cache blocks in place), a dummy row (position
        -1, which writes only spare rows) for each slot not decoding; at a smaller one the
        sequences, padded by repeating the last (an identical write; dummy rows when there
        are none: warm-up). A lone stream beside a chunk then carries one row, not one per
        slot: on the serving-scale checkpoint a decode step of
        one stream took 18-19 ms at batch 1 and 24-25 at every slot's batch, and a late
        16-position chunk of a 16-frame prompt ran in two parts of ~50 ms each beside it.
        -> (tokens, positions, slot rows, where each sequence's logits are among the rows)."""
        tokens, positions, slots = (np.asarray(a, dtype=np.int32) for a in (tokens, positions, slots))
        n = len(tokens)
        if batch == self.num_slots:
            feed, where = self._rows_in_slot_order(tokens, positions, slots)
            return feed, where, self._slot_rows(np.arange(batch), slots), slots
        if not n:
            dummy = np.zeros(batch, np.int32)
            return to_tensor(dummy), to_tensor(dummy - 1), self._slot_rows(dummy, ()), np.zeros(0, np.int64)
        pick = np.minimum(np.arange(batch), n - 1)
        return (to_tensor(tokens[pick]), to_tensor(positions[pick]), self._slot_rows(slots[pick], ()),
                np.arange(n))

    def _written(self, slots, positions) -> None:
        for slot, position in zip(np.asarray(slots).tolist(), np.asarray(positions).tolist()):
            self.prefixes.written(slot, position)

    @property
    def copies_prefixes(self) -> bool:
        """Whether :meth:`copy_prefix` can run (the CPU kernels, more than one slot)."""
        return self._copy_rows is not None

    def copy_prefix(self, src: int, dst: int, rows: int, most: int | None = None) -> int:
        """Copy the keys and values of positions 0..rows-1 from slot ``src`` to ``dst`` in
        every layer (at most what ``src`` holds of its recorded prompt ids, which ``dst`` then
        holds too), from the first position ``dst`` does not hold of them yet, at most
        ``most`` positions this call (None: all; a copy in pieces, one per engine step, keeps
        a step short where ``dst``'s pages were never written: 260 positions took 81-87 ms
        there on a 2-core VM against 7 ms over written ones); returns the positions ``dst``
        now holds of them."""
        if self._copy_rows is None:
            raise RuntimeError("copying cache rows between slots needs the CPU kernels and more than one slot")
        for slot in (src, dst):
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} is outside the cache's {self.num_slots} slots")
        rows = max(0, min(rows, self.prefixes.rows(src)))
        if src == dst:
            return rows
        ids = self.prefixes.ids(src)[:rows]
        first = self.prefixes.reusable(dst, ids)  # (at most rows)
        self.prefixes.written(dst, first)
        if most is not None:
            rows = min(rows, first + max(0, most))
        if rows <= first:
            return first
        scalars = [to_tensor(np.array([v], np.int32))
                   for v in (src, dst, first, rows, self.cfg.text.num_key_value_heads)]
        done = None
        for layer in self.lm.model.layers:
            attention = layer.self_attn
            blocks = [cache[j] for j in range(len(attention.blocks)) for cache in (attention.k_cache, attention.v_cache)]
            done = self._copy_rows(*scalars, attention.block_row_counts, *blocks)
        done.asnumpy()  # (waits for the copies: the ops launch asynchronously)
        self.prefixes.keep(dst, ids, rows)
        return rows

    def _rows_in_slot_order(self, tokens, positions, slots) -> tuple[Tensor, Tensor]:
        """Decode rows at the batch of every slot, in slot order: (tokens, positions), with
        a dummy row at position -1 (it writes only spare rows) for every slot not in
        ``slots``. The step then attends over the cache blocks in place."""
        feed = np.zeros(self.num_slots, np.int32)
        where = np.full(self.num_slots, -1, np.int32)
        feed[slots], where[slots] = tokens, positions
        return to_tensor(feed), to_tensor(where)

    def _slot_rows(self, rows: np.ndarray, decoding) -> Tensor:
        """The slots a decode kernel's ``rows`` read (slot numbers, one per row): with the CPU
        kernels (slot, prefix slot, prefix rows) rows (B, 3), where the sequences ``decoding``
        in this step that hold the same leading text read it from one of them
        (:meth:`SlotPrefixes.sources`, within the cache's first block: with the kernels, the
        only one); elsewhere the slots (B,)."""
        rows = np.asarray(rows, dtype=np.int32)
        if not self.lm.kernel_attention:
            return to_tensor(rows)
        table = np.stack([rows, rows, np.zeros_like(rows)], 1)
        if self.share_prefixes:
            decoding = sorted(set(np.asarray(decoding).tolist()))
            shared = dict(zip(decoding, self.prefixes.sources(decoding, self.lm.blocks[0][1])))
            for i, slot in enumerate(rows.tolist()):
                table[i, 1:] = shared.get(slot, (slot, 0))
        return to_tensor(table)

    def _graph_context(self, context: int) -> Tensor:
        """The ``key_positions`` a prefill graph gets for a chunk at ``context``: the kernels
        ignore it, so every chunk gets the same (one graph per chunk size)."""
        return self._contexts[self.max_len if self.lm.kernel_attention else context]

    def prefill(self, slot: int, embeds, logit_index: Sequence[int] | None = None) -> np.ndarray:
        """Run a whole prompt into cache ``slot``, chunk by chunk; fp32 logits at
        ``logit_index`` (default: the last prompt position), shape (n, vocab)."""
        length = embeds.shape[1]
        if length > self.max_len:
            raise ValueError(f"prompt of {length} tokens exceeds the max context {self.max_len}")
        chunks = self.plan.chunks(length)
        if logit_index is None:
            for chunk in chunks:
                last = self.prefill_chunk(slot, embeds, chunk)
            return last
        rows = [self.prefill_chunk(slot, embeds, chunk, all_logits=True) for chunk in chunks]
        return np.concatenate(rows, 0)[np.asarray(list(logit_index), dtype=np.int64)]

    def decode(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One token for each of n sequences: tokens, positions and cache slots (n,) ->
        fp32 logits (n, vocab). The sequences run in at most two groups (short ones and
        long ones, when ``decode_cost`` says two steps cost less than one at the longest
        context), each at its batch bucket and the context bucket of its furthest position.
        With the CPU kernels, one group at context ``max_len`` (each row reads its own
        positions: the bucket costs nothing, and the step never splits)."""
        tokens, positions, slots = (np.asarray(a, dtype=np.int32) for a in (tokens, positions, slots))
        self._written(slots, positions)
        order = np.argsort(positions, kind="stable")
        split = self.decode_cost.best_split(positions[order] + 1)
        logits = np.empty((len(tokens), self.vocab_size), np.float32)
        for group in (order[:split], order[split:]):
            if len(group):
                logits[group] = self._decode_group(tokens[group], positions[group], slots[group])
        return logits

    def _decode_group(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One step at the group's batch and context buckets, its rows as
        :meth:`_rows_at_batch` puts them."""
        context = self._contexts[smallest_at_least(self.decode_contexts, int(np.max(positions)) + 1, "context")]
        feed, where, table, pick = self._rows_at_batch(tokens, positions, slots, self.plan.batch_bucket(len(tokens)))
        return self._decode(feed, where, table, context).asnumpy()[pick]

    def warm_up(self, progress=None, timed: bool = True) -> int:
        """Compile every graph of the shape plan and the mixed steps (writes only garbage into
        cache slot 0, so run it while no sequence is live), and with ``timed`` time each prefill chunk size at
        each context into ``graph_seconds`` (the engine sizes chunks by it: after a compile
        the faster of two runs, as the first runs still allocate; at a further context of the
        same graph one run). ``progress(done, total, kind, a, context)`` is called after each
        (kind, size, context). Returns the number of graphs compiled."""
        # the mixed steps at each decode batch bucket: (kind, chunk size, max_len, batch[, part])
        mixed = ([("mixed", size, self.max_len, batch) for batch in self.plan.batch_buckets for size in self.mixed_sizes]
                 + [("mixed part", min(self.mixed_sizes, default=0), self.max_len, batch, part)
                    for batch in self.plan.batch_buckets for part in range(len(self.chunk_layer_parts))])
        shapes = self.plan.graphs(self.decode_contexts) + mixed
        width = self.cfg.text.hidden_size
        self.prefixes.forget()
        compiled = set()
        none = np.zeros(0, np.int32)
        for done, (kind, size, context, *batch_part) in enumerate(shapes, 1):
            if kind == "mixed":  # a chunk with every decode row a dummy
                self.prefill_chunk_and_decode(0, ops.zeros((1, size, width), self.lm.dtype),
                                              Chunk(0, size, size, context), none, none, none, batch=batch_part[0])
                compiled.add((kind, size, *batch_part))
            elif kind == "mixed part":
                rows = ops.zeros((1, size, width), self.lm.dtype)
                self.prefill_chunk_part_and_decode(0, rows, Chunk(0, size, size, context), batch_part[1], rows,
                                                   none, none, none, batch=batch_part[0])
                compiled.add((kind, size, *batch_part))
            elif kind == "decode":
                self._decode_group(np.zeros(size, np.int32), np.zeros(size, np.int32) + context - 1,
                                   np.zeros(size, np.int32))
                compiled.add((kind, size, context))
            else:
                # the chunk that ends the context (in place, a size may exceed a short context)
                embeds = ops.zeros((1, max(context, size), width), self.lm.dtype)
                chunk = Chunk(max(0, context - size), min(size, context), size, context)
                graph = (kind, size, self.max_len if self.lm.kernel_attention else context)
                new = graph not in compiled
                if new:
                    self.prefill_chunk(0, embeds, chunk)
                    compiled.add(graph)
                if timed:
                    self.graph_seconds[(kind, size, context)] = min(
                        _seconds(self.prefill_chunk, 0, embeds, chunk) for _ in range(2 if new else 1))
            if progress is not None:
                progress(done, len(shapes), kind, size, context)
        return len(compiled)


#: the longest prefill chunk that gets a mixed graph (chunk + decode rows): while streams
#: decode, the pacer keeps chunks short
MIXED_CHUNK_MAX = 64


def _chunk_rows(embeds, chunk: Chunk, dtype) -> tuple[Tensor, Tensor]:
    """A chunk's rows of ``embeds`` (1, L, D: an array or a Tensor) padded to its size, as a
    (1, size, D) Tensor of ``dtype``, and their positions (1, size): padding rows feed
    nothing (position -1: their keys/values go to the spare rows)."""
    piece = embeds[:, chunk.start:chunk.start + chunk.length]
    if isinstance(piece, np.ndarray):
        if chunk.size > chunk.length:
            piece = np.concatenate((piece, np.zeros((1, chunk.size - chunk.length, piece.shape[2]), piece.dtype)), 1)
        piece = to_tensor(np.ascontiguousarray(piece)).astype(dtype)
    elif chunk.size > chunk.length:
        pad = ops.zeros((1, chunk.size - chunk.length, embeds.shape[2]), embeds.dtype)
        piece = ops.concat((piece, pad), 1)
    return piece, _chunk_positions(chunk)


def _chunk_positions(chunk: Chunk) -> Tensor:
    """A chunk's positions (1, size); padding rows at -1 (they feed nothing)."""
    positions = np.arange(chunk.start, chunk.start + chunk.size)
    positions[chunk.length:] = -1
    return to_tensor(positions.astype(np.int32).reshape(1, -1))


def layer_parts(layers: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``layers`` split into ``parts`` (at most one a layer) consecutive runs as even as can be:
    ((first, last), ...) with ``last`` exclusive."""
    parts = min(parts, layers)
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return tuple(zip(bounds, bounds[1:]))


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def estimate_decode_cost(plan: ShapePlan, cfg: PllavaConfig, backend: Backend, live_rows: bool = False,
                         half_weights: bool = False) -> DecodeCost:
    """Bytes a decode step reads: the language weights (``half_weights``: kept in half
    precision), then the KV rows it attends over (``live_rows``: only the sequences' own
    positions, as the CPU decode kernel does)."""
    t = cfg.text
    item = np.dtype(np.float32).itemsize if backend.dtype == ms.float32 else 2
    layer = (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
             + t.num_attention_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    weights = (t.num_hidden_layers * layer + t.vocab_size * t.hidden_size) * (2 if half_weights else item)
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * item
    return DecodeCost.estimate(plan, weights, kv, live_rows)

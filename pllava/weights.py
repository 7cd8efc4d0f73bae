"""Read PLLaVA/LLaVA checkpoints into canonical llava-hf names and load them strictly.

Three on-disk layouts are accepted and normalised to the llava-hf names
(``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.weight``):

* llava-hf (``llava-hf/llava-v1.6-vicuna-7b-hf``): already canonical;
* newer transformers (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``);
* ermu2001/pllava-7b's PEFT save (``language_model.base_model.model.*`` with LoRA on q/v):
  the LoRA delta is merged as ``W + (alpha / r) * B @ A`` in fp32.

Shards are streamed tensor by tensor through the ``safetensors`` package (``ml_dtypes`` lets
numpy hold bf16), so peak host memory stays near the size of the part being loaded.
"""
from __future__ import annotations

import json
import os
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16 so safetensors can read BF16)
import numpy as np
from safetensors import safe_open

from .damaged import damage_hint

log = logging.getLogger(__name__)

VISION = "vision"
LANGUAGE = "language"
PARTS = (VISION, LANGUAGE)
DEFAULT_LORA_ALPHA = 4.0  # PLLaVA's official inference scripts (demo.sh, eval.sh)
CKPT_ALPHA_KEY = "pllava_lora_alpha"

# Newer transformers layout -> llava-hf layout (applied to the start of the name).
_RENAMES = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    # transformers >= 5 saves the CLIP tower without its ``vision_model`` level.
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)
# Keys a checkpoint may carry that PLLaVA never uses.
_UNUSED = re.compile(r"(^image_newline$|\.position_ids$|\.inv_freq$|^vision_tower\.vision_model\.post_layernorm\.)")
_LORA = re.compile(r"^(?P<base>.+)\.lora_(?P<which>[AB])(\.default)?\.weight$")


class WeightsError(ValueError):
    """The checkpoint does not fit the model: names which keys and why."""


def canonical_name(name: str) -> str:
    """Map any accepted layout's key to the llava-hf name (LoRA keys keep ``.lora_A/B``)."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    name = name.replace("language_model.base_model.model.", "language_model.", 1)
    return name.replace(".base_layer.weight", ".weight")


def part_of(name: str) -> str:
    return LANGUAGE if name.startswith("language_model.") else VISION


def _open_shard(path: Path):
    """``safe_open`` of one shard; a file it cannot read is a WeightsError naming it (the
    library's own error is neither an OSError nor a ValueError, and names no file)."""
    try:
        return safe_open(str(path), framework="np")
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError, OSError...
        try:  # the library calls a file it may not open "No such file or directory"
            with open(path, "rb"):
                pass
        except PermissionError as denied:
            raise WeightsError(f"{path} cannot be read ({denied.strerror}): this process runs as uid "
                               f"{os.geteuid()} and the file belongs to uid {_owner(path)}; make the checkpoint "
                               "readable to this user (chmod -R a+rX), or run as its owner") from None
        except OSError:
            pass
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}){damage_hint(path)}") from None


def _owner(path: Path) -> str:
    try:
        return str(path.stat().st_uid)
    except OSError:
        return "unknown (its folder cannot be entered)"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """Safetensors shards in index order (or the single file)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, AttributeError) as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            raise WeightsError(f"{index} is not a safetensors index (JSON with a weight_map): {exc}"
                               f"{damage_hint(index)}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise WeightsError(f"{index} lists shards that are not in {model_dir}: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files (and no model.safetensors.index.json) in {model_dir}")
    return files


@dataclass
class _LoraParts:
    base: np.ndarray | None = None
    a: np.ndarray | None = None
    b: np.ndarray | None = None

    def ready(self) -> bool:
        return self.base is not None and self.a is not None and self.b is not None


def merge_lora(base: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, alpha: float) -> np.ndarray:
    """W + (alpha / r) * B @ A in fp32, r = rank of A (rows)."""
    rank = lora_a.shape[0]
    if lora_b.shape[1] != rank or base.shape != (lora_b.shape[0], lora_a.shape[1]):
        raise WeightsError(f"LoRA shapes do not fit: base {base.shape}, A {lora_a.shape}, B {lora_b.shape}")
    delta = lora_b.astype(np.float32) @ lora_a.astype(np.float32)
    return base.astype(np.float32) + (alpha / rank) * delta


_LANGUAGE_WEIGHT = re.compile(r"^language_model\.(?:model\.layers\.\d+\.(?:self_attn|mlp)\.)?(?P<kind>\w+?)"
                              r"(?:\.lora_[AB](?:\.default)?)?\.weight$")


def has_lora(model_dir: str | Path) -> bool:
    """Whether a safetensors checkpoint folder holds LoRA factors (read from the headers only)."""
    for path in checkpoint_files(model_dir):
        with _open_shard(path) as f:
            if any(".lora_" in key for key in f.keys()):
                return True
    return False


def stored_weight_dtypes(source: str | Path) -> dict[str, str]:
    """Kind of language-model projection (``q_proj``, ..., ``down_proj``, ``lm_head``) -> the
    one dtype a safetensors checkpoint folder stores every layer's weight of that kind in
    (safetensors spelling: "F16", "BF16", "F32"...). Kinds with LoRA factors are left out
    (their weights are merged in float32 at load), as are kinds stored in mixed dtypes; a
    .ckpt or a folder without safetensors gives {}. Read from the headers only."""
    source = Path(source)
    if not source.is_dir() or not any(source.glob("*.safetensors")):
        return {}
    dtypes: dict[str, set[str]] = {}
    lora: set[str] = set()
    for path in checkpoint_files(source):
        with _open_shard(path) as f:
            for key in f.keys():
                name = canonical_name(key)
                match = _LANGUAGE_WEIGHT.match(name)
                if match is None:  # (embeddings, norms, vision)
                    continue
                if _LORA.match(name):
                    lora.add(match.group("kind"))
                else:
                    dtypes.setdefault(match.group("kind"), set()).add(f.get_slice(key).get_dtype())
    return {kind: next(iter(found)) for kind, found in dtypes.items() if len(found) == 1 and kind not in lora}


_VISION_PROJECTION = re.compile(r"^(?:vision_tower\.vision_model\.encoder\.layers\.\d+\.(?:self_attn\.\w+_proj|mlp\.fc[12])"
                                r"|multi_modal_projector\.linear_[12])\.weight$")


def stored_vision_dtype(source: str | Path) -> str | None:
    """The one dtype (safetensors spelling) a checkpoint folder stores every projection of the
    vision tower and the projector in; None where they differ or for a .ckpt / no safetensors.
    Read from the headers only."""
    source = Path(source)
    if not source.is_dir() or not any(source.glob("*.safetensors")):
        return None
    found: set[str] = set()
    for path in checkpoint_files(source):
        with _open_shard(path) as f:
            found.update(f.get_slice(key).get_dtype() for key in f.keys() if _VISION_PROJECTION.match(canonical_name(key)))
    return next(iter(found)) if len(found) == 1 else None


def iter_safetensors(model_dir: str | Path, parts: Iterable[str] = PARTS,
                     lora_alpha: float = DEFAULT_LORA_ALPHA) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, array in its stored dtype, or fp32 when LoRA was merged) for
    the requested parts, one tensor at a time. Unused keys are dropped here."""
    parts = set(parts)
    files = checkpoint_files(model_dir)
    names: dict[Path, list[str]] = {}
    for path in files:
        with _open_shard(path) as f:
            names[path] = list(f.keys())
    lora_bases = {m.group("base") + ".weight" for keys in names.values() for k in keys
                  if (m := _LORA.match(canonical_name(k)))}
    pending: dict[str, _LoraParts] = {}
    for path in files:
        with _open_shard(path) as f:
            for key in names[path]:
                name = canonical_name(key)
                if _UNUSED.search(name) or part_of(name) not in parts:
                    continue
                lora = _LORA.match(name)
                if lora is None and name not in lora_bases:
                    yield name, f.get_tensor(key)
                    continue
                target = lora.group("base") + ".weight" if lora else name
                slot = pending.setdefault(target, _LoraParts())
                which = lora.group("which").lower() if lora else "base"
                setattr(slot, which, f.get_tensor(key))
                if slot.ready():
                    yield target, merge_lora(slot.base, slot.a, slot.b, lora_alpha)
                    del pending[target]
    if pending:
        detail = ", ".join(f"{k} (has {[w for w in ('base', 'a', 'b') if getattr(v, w) is not None]})"
                           for k, v in sorted(pending.items()))
        hint = ""
        if all(v.base is None for v in pending.values()):
            hint = (" -- adapters without the weights they adapt, as a PLLaVA training run saves them (LoRA "
                    "and the projector only): point --model at a full checkpoint, which holds the base "
                    "weights too (as ermu2001/pllava-7b does)")
        raise WeightsError(f"incomplete LoRA triples in {model_dir}: {detail}{hint}")


def iter_ckpt(path: str | Path, parts: Iterable[str] = PARTS,
              lora_alpha: float = DEFAULT_LORA_ALPHA) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a ``pllava convert`` .ckpt (canonical names, LoRA already merged)."""
    import mindspore as ms

    parts = set(parts)
    params = ms.load_checkpoint(str(path))
    alpha = params.pop(CKPT_ALPHA_KEY, None)
    if alpha is not None and float(np.asarray(alpha.asnumpy()).reshape(-1)[0]) != float(lora_alpha):
        stored = float(np.asarray(alpha.asnumpy()).reshape(-1)[0])
        raise WeightsError(f"{path} was converted with --lora-alpha {stored:g}, but {lora_alpha:g} was "
                           f"asked for: convert again or pass --lora-alpha {stored:g}")
    for name in list(params):
        if part_of(name) in parts and not _UNUSED.search(name):
            param = params.pop(name)
            if param.dtype == ms.bfloat16:
                param = param.astype(ms.float32)
            yield name, param.asnumpy()


def iter_weights(source: str | Path, parts: Iterable[str] = PARTS,
                 lora_alpha: float = DEFAULT_LORA_ALPHA) -> Iterator[tuple[str, np.ndarray]]:
    """Weights from a checkpoint folder (safetensors, else ``model.ckpt``) or a .ckpt file."""
    source = Path(source)
    if source.is_file() and source.suffix == ".ckpt":
        return iter_ckpt(source, parts, lora_alpha)
    if not source.is_dir():
        raise WeightsError(f"{source} is neither a checkpoint folder nor a .ckpt file")
    if not any(source.glob("*.safetensors")) and (source / "model.ckpt").exists():
        return iter_ckpt(source / "model.ckpt", parts, lora_alpha)
    return iter_safetensors(source, parts, lora_alpha)


def load_into(cell, weights: Iterable[tuple[str, np.ndarray]], prefix: str = "",
              skip=lambda name: False, ignore=lambda name: False) -> None:
    """Assign ``weights`` to ``cell``'s parameters strictly, converting to each parameter's
    dtype. ``prefix`` is stripped from checkpoint names; ``skip(param_name)`` marks state that
    is not loaded (KV caches); ``ignore(ckpt_name)`` marks keys the cell does not use (CLIP
    layers past the selected one). Parts of fused projections fill their rows of one parameter.
    Missing, unexpected and mis-shaped keys raise one error that names them all."""
    import mindspore as ms
    from mindspore import Tensor

    from .layers import checkpoint_placements, pack_panels, packed_weights

    params = {name: p for name, p in cell.parameters_and_names() if not skip(name)}
    packed = packed_weights(cell)  # kept in panels: the checkpoint's (N, K) is packed
    placements = checkpoint_placements(cell)

    def shape_of(name: str) -> tuple:
        """The parameter's shape as the checkpoint holds it."""
        shape = tuple(params[name].shape)
        return (packed[name], shape[1]) if name in packed else shape

    fused: dict[str, np.ndarray] = {}  # parameter -> staging array while its parts arrive
    parts_left = {}
    for place in placements.values():
        parts_left[place.param] = parts_left.get(place.param, 0) + 1
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    rounded: list[str] = []
    halves = {ms.float16: np.float16, ms.bfloat16: ml_dtypes.bfloat16}

    def staging_dtype(param):
        """A fused projection's parts are gathered in its own half dtype or in float32."""
        return halves.get(param.dtype, np.float32)

    def note_rounding(ckpt_name: str, array, param):
        """Name a tensor that goes into a half-precision parameter with values it cannot hold."""
        half = halves.get(param.dtype)
        if half is not None and array.dtype.name != np.dtype(half).name:
            wide = array.astype(np.float32)
            if not np.array_equal(wide.astype(half).astype(np.float32), wide):
                rounded.append(ckpt_name)

    def assign(name, array):
        param = params[name]
        note_rounding(prefix + name, array, param)
        if name in packed:
            array = pack_panels(array)
        if param.dtype == ms.bfloat16 or array.dtype == ml_dtypes.bfloat16:
            tensor = Tensor(array.astype(np.float32), dtype=param.dtype)
        else:
            tensor = Tensor(np.ascontiguousarray(array), dtype=param.dtype)
        param.set_data(tensor)

    for ckpt_name, array in weights:
        name = ckpt_name[len(prefix):] if prefix and ckpt_name.startswith(prefix) else ckpt_name
        place = placements.get(name)
        param = params.get(place.param if place else name)
        if param is None:
            if not ignore(ckpt_name):
                unexpected.append(ckpt_name)
            continue
        if place is not None:  # one part of a fused projection
            expected = (place.stop - place.start,) + shape_of(place.param)[1:]
            if tuple(array.shape) != expected:
                mismatched.append(f"{ckpt_name}: checkpoint {tuple(array.shape)} vs model {expected}")
                continue
            stage = fused.setdefault(place.param, np.zeros(shape_of(place.param), dtype=staging_dtype(param)))
            note_rounding(ckpt_name, array, param)
            stage[place.start:place.stop] = array.astype(np.float32)  # (cast to the stage on assignment)
            loaded.add(name)
            parts_left[place.param] -= 1
            if parts_left[place.param] == 0:
                assign(place.param, fused.pop(place.param))
            continue
        if tuple(array.shape) != shape_of(name):
            mismatched.append(f"{ckpt_name}: checkpoint {tuple(array.shape)} vs model {shape_of(name)}")
            continue
        assign(name, array)
        loaded.add(name)
        del array
    expected_names = (set(params) - {p.param for p in placements.values()}) | {
        n for n in placements if placements[n].param in params}
    missing = sorted(expected_names - loaded)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(prefix + m for m in missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:20]))
    if problems:
        raise WeightsError("checkpoint does not match the model: " + " | ".join(problems))
    if rounded:
        log.warning("%d tensor(s) kept in half precision hold values it cannot represent (rounded): %s",
                    len(rounded), ", ".join(rounded[:5]) + (" ..." if len(rounded) > 5 else ""))

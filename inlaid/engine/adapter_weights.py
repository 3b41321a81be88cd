"""Full validation of a PEFT adapter's weight file against the base model. Torch-free.

The coordinator runs this before it answers `AddTask` (and for every task in the config),
so an adapter that could only fail later, on the executor and under live requests, is
refused up front. It reads the safetensors container itself (an 8-byte header length, a
JSON header, then the raw little-endian tensor bytes) and checks:

* the container: the header is a JSON object within its bounds, every tensor's byte range
  lies inside the data section, the ranges tile it exactly (no gap, no overlap, nothing
  truncated or appended), no name appears twice;
* the names: LoRA A/B of the seven projections only, layers the base has, both halves of
  every (layer, projection), exactly the projections `target_modules` lists, in every layer;
* the shapes: A is [r, in] and B is [out, r] with the base's in/out for that projection and
  the config's r, and r fits the slot pool (`max_lora_rank`);
* the values: a float dtype, every value finite and within +-65504 (float16's range: it
  fits every pool dtype, and keeps the CPU's masked LoRA route, which multiplies every
  token by every slot's A before masking, from turning another adapter's zeros into NaN).

Files are read with plain reads (no mmap): a file truncated while it is checked gives an
error, never a SIGBUS.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inlaid.bounded_files import TOO_LARGE, open_regular

from inlaid.engine.adapter_config import (
    LORA_KEY_FORM, WEIGHTS_FILE, AdapterError, AdapterSpec, parse_lora_key, read_adapter_spec,
)
from inlaid.engine.config import ModelConfig

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
MAX_ABS_WEIGHT = 65504.0  # float16's largest finite value
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_CHUNK_ELEMENTS = 1 << 22  # values are checked this many at a time (bounded memory)


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data section
    end: int


def projection_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able projection of the base."""
    q_width = model.num_heads * model.head_dim
    kv_width = model.num_kv_heads * model.head_dim
    hidden, inner = model.hidden_size, model.intermediate_size
    return {
        "q_proj": (hidden, q_width),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def max_weights_bytes(model: ModelConfig, max_rank: int) -> int:
    """The largest adapter_model.safetensors a LoRA of rank <= max_rank on this base can be:
    every projection's A and B in float64, and the largest header safetensors allows."""
    widths = sum(inputs + outputs for inputs, outputs in projection_shapes(model).values())
    return 8 + MAX_HEADER_BYTES + 8 * model.num_layers * max_rank * widths


def check_adapter_files(name: str, path: str, model: ModelConfig, max_rank: int) -> AdapterSpec:
    """Before anything reads the adapter's weights whole (a hash, a copy, the checks): its
    config (read bounded: MAX_CONFIG_BYTES) with a rank within max_rank, and weights that are
    a regular file no larger than `max_weights_bytes`. A FIFO hung the call, a link to
    /dev/zero was hashed for ever, and a 20 GB sparse file took 28 s to hash (an outside
    probe); copied into a state directory, it would have filled the disk. The rank first: a
    too-high rank made a too-large file, and the size said nothing of the rank."""
    spec = read_adapter_spec(name, path)
    check_rank(spec, model, max_rank)
    bound = max_weights_bytes(model, max_rank)
    try:
        os.close(open_regular(Path(spec.path) / WEIGHTS_FILE, bound))
    except OSError as error:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE}: {error.strerror} (a LoRA of rank <= {max_rank} on "
                           "this base is no larger)" if error.errno == TOO_LARGE else
                           f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {error.strerror}") from None
    return spec


def check_rank(spec: AdapterSpec, model: ModelConfig, max_rank: int) -> None:
    if spec.rank_bound > max_rank and (used := spec.rank_used(model.num_layers)) > max_rank:
        raise AdapterError(f"adapter {spec.name!r} has rank {used}{' (rank_pattern)' if used > spec.rank else ''}; "
                           f"the engine's max_lora_rank is {max_rank} (a server's: [executor] max_lora_rank)")


def check_servable_adapter(name: str, path: str, model: ModelConfig, max_rank: int) -> AdapterSpec:
    """The adapter's spec, once its config and every weight passed the checks a server runs
    before it serves a task (AdapterError names the first problem). The server's AddTask and
    a Ray replica's loader both call it, so the two can never accept different adapters."""
    spec = read_adapter_spec(name, path)
    check_adapter_weights(spec, model, max_rank)
    return spec


def check_adapter_weights(spec: AdapterSpec, model: ModelConfig, max_rank: int) -> None:
    """Raise AdapterError naming the first problem; return when the weights are servable."""
    where = f"adapter {spec.name!r}"
    check_rank(spec, model, max_rank)
    path = Path(spec.path) / WEIGHTS_FILE
    try:
        # the descriptor checked is the one read (a file swapped for a FIFO after a check hung the call)
        with os.fdopen(open_regular(path, max_weights_bytes(model, max_rank)), "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            entries, data_start = _read_header(file, file_size, where)
            _check_layout(entries, file_size - data_start, where)
            _check_names_and_shapes(entries, spec, model, where)
            for entry in entries:
                _check_values(file, data_start, entry, where)
    except OSError as error:
        raise AdapterError(f"{where}: cannot read {path}: {error}") from None


def _read_header(file, file_size: int, where: str) -> tuple[list[_TensorEntry], int]:  # type: ignore[no-untyped-def]
    prefix = file.read(8)
    if len(prefix) < 8:
        raise AdapterError(f"{where}: {WEIGHTS_FILE} is {file_size} bytes, too short for a safetensors header")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(MAX_HEADER_BYTES, file_size - 8):
        # Its value is not echoed: it is the first 8 bytes of whatever file the path names
        # (an outside probe read "root:x:0" of /etc/passwd back from the number).
        raise AdapterError(f"{where}: {WEIGHTS_FILE} is not a safetensors file: its header length field is beyond "
                           f"the file's {file_size} bytes (or safetensors' 100 MB limit)")
    raw = file.read(header_size)
    if len(raw) != header_size:
        raise AdapterError(f"{where}: {WEIGHTS_FILE} was truncated while being read")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in pairs]
        if len(names) != len(set(names)):
            raise AdapterError(f"{where}: {WEIGHTS_FILE} names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except AdapterError:  # a tensor named twice
        raise
    except (ValueError, RecursionError) as error:  # ValueError: also an integer of over 4,300 digits
        raise AdapterError(f"{where}: {WEIGHTS_FILE} has a corrupt header: {error}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: {WEIGHTS_FILE}'s header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries.append(_entry(name, info, where))
    return entries, 8 + header_size


def _entry(name: str, info: object, where: str) -> _TensorEntry:
    def bad(what: str) -> AdapterError:
        return AdapterError(f"{where}: tensor {name!r:.120} in {WEIGHTS_FILE}: {what}")

    if not isinstance(info, dict):
        raise bad("its header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"dtype {dtype!r:.40} (LoRA weights must be F32, F16, BF16 or F64)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r:.80} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):  # fmt: skip
        raise bad(f"data_offsets {offsets!r:.80} are not [begin, end]")
    count = 1
    for size in shape:
        count *= size
    needed = count * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes; shape {shape} of {dtype} needs {needed}")
    return _TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(entries: list[_TensorEntry], data_size: int, where: str) -> None:
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps the one before it" if entry.begin < position else "leaves a gap before it"
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} in {WEIGHTS_FILE} {what} (corrupt file)")
        position = entry.end
    if position != data_size:
        how = "truncated" if position > data_size else "followed by stray bytes"
        raise AdapterError(f"{where}: {WEIGHTS_FILE} is {how}: its tensors need {position} data bytes, "
                           f"the file has {data_size}")


def _shape_mismatch_cause(found: tuple[int, ...], expected: tuple[int, int], half: str, projection: str,
                          model: ModelConfig) -> str:
    """Why a LoRA matrix has the wrong shape, by the dimension that differs: A is (rank, in),
    B is (out, rank). With the rank right, "rank mismatch" sent users hunting a rank problem
    when the adapter was trained on a base of another width."""
    rank_axis, feature_axis = (0, 1) if half == "A" else (1, 0)
    if len(found) != 2 or found[rank_axis] != expected[rank_axis]:
        return ("rank mismatch: weights of another rank than the config says, or trained for another base model"
                if len(found) == 2 else "a LoRA matrix has two dimensions")
    side = "input" if half == "A" else "output"
    dimension = "hidden size" if expected[feature_axis] == model.hidden_size else f"{projection} {side} size"
    return (f"trained for another base model ({dimension} {found[feature_axis]}, "
            f"this base has {expected[feature_axis]})")


def _check_names_and_shapes(entries: list[_TensorEntry], spec: AdapterSpec, model: ModelConfig, where: str) -> None:
    shapes = projection_shapes(model)
    seen: set[tuple[int, str, str]] = set()
    for entry in entries:
        parsed = parse_lora_key(entry.name)
        if parsed is None:
            raise AdapterError(f"{where}: unsupported tensor {entry.name!r:.120} (only LoRA A/B of projections, "
                               f"keyed as PEFT saves them: {LORA_KEY_FORM})")
        layer, projection, half = parsed
        if layer >= model.num_layers:
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} names layer {layer}; "
                               f"the model has {model.num_layers}")
        if projection not in spec.target_modules:
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} is for {projection}, which target_modules "
                               f"({', '.join(spec.target_modules)}) does not list")
        if spec.excludes(layer, projection):  # PEFT builds no LoRA there, and ignores these tensors
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} is for layer {layer} {projection}, which "
                               "target_modules, exclude_modules or layers_to_transform leave without LoRA (PEFT would "
                               "not apply it)")
        if (layer, projection, half) in seen:
            raise AdapterError(f"{where}: layer {layer} {projection} has two lora_{half} tensors")
        seen.add((layer, projection, half))
        in_features, out_features = shapes[projection]
        rank = spec.rank_at(layer, projection)
        expected = (rank, in_features) if half == "A" else (out_features, rank)
        if entry.shape != expected:
            raise AdapterError(f"{where}: layer {layer} {projection} lora_{half} has shape {list(entry.shape)}; "
                               f"adapter_config.json says {spec.rank_words(rank)}, so this base model needs "
                               f"{list(expected)} "
                               f"({_shape_mismatch_cause(entry.shape, expected, half, projection, model)})")
    # exclude_modules: the projections it matches carry no LoRA; every other target carries both halves
    # (it used to excuse any missing pair once exclude_modules was set, matching or not: the
    # engine computed zeros where PEFT keeps its initial weights, a silent difference)
    missing = [(layer, projection, half) for layer in range(model.num_layers) for projection in spec.target_modules
               if not spec.excludes(layer, projection) for half in "AB" if (layer, projection, half) not in seen]
    if not seen and not missing:
        if spec.target_names is not None:  # nothing seen, nothing missing: the names reach no projection
            raise AdapterError(f"{where}: target_modules {spec.target_names!r:.80} matches no projection of this "
                               f"model's {model.num_layers} layers (PEFT: \"Target modules ... not found\")")
        raise AdapterError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors (target_modules, exclude_modules or "
                           "layers_to_transform leave every projection without)")
    if missing:
        layer, projection, half = missing[0]
        raise AdapterError(f"{where}: {len(missing)} LoRA tensors are missing, e.g. layer {layer} {projection} "
                           f"lora_{half} (target_modules lists it"
                           + (", exclude_modules and layers_to_transform do not leave it out)"
                              if spec.has_exclusions else ")"))


def _check_values(file, data_start: int, entry: _TensorEntry, where: str) -> None:  # type: ignore[no-untyped-def]
    dtype = _DTYPES[entry.dtype]
    total = (entry.end - entry.begin) // dtype.itemsize
    file.seek(data_start + entry.begin)
    done = 0
    while done < total:
        count = min(_CHUNK_ELEMENTS, total - done)
        raw = file.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise AdapterError(f"{where}: {WEIGHTS_FILE} was truncated while being read")
        values = np.frombuffer(raw, dtype=dtype)
        if entry.dtype == "BF16":  # bfloat16 is the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} holds NaN or infinite values")
        largest = float(np.abs(values).max()) if count else 0.0
        if largest > MAX_ABS_WEIGHT:
            raise AdapterError(f"{where}: tensor {entry.name!r:.120} holds a value of magnitude {largest:.3g}; "
                               f"LoRA weights must lie within +-{MAX_ABS_WEIGHT:g}")
        done += count

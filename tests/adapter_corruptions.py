"""Ways to corrupt a PEFT adapter directory, shared by the fault unit tests and the server
fuzz tests: each entry edits a copy in place and names a phrase the refusal must contain."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copy_adapter(source: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(source, target)
    return target


def rewrite_tensors(adapter: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Load the adapter's tensors, let `change` edit the dict, save them back."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))


def first_tensor(tensors: dict, half: str = "A") -> str:
    return next(k for k in sorted(tensors) if f"lora_{half}" in k)


def _set_value(adapter: Path, half: str, index: int, value: float) -> None:
    rewrite_tensors(adapter, lambda t: t[first_tensor(t, half)].view(-1).__setitem__(index, value))


def _raw_header(adapter: Path) -> tuple[dict, bytes]:
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _write_raw(adapter: Path, header: dict | list | bytes, body: bytes) -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def _shift_first_offset(adapter: Path, delta: int) -> None:
    header, body = _raw_header(adapter)
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[name]["data_offsets"][1] += delta
    _write_raw(adapter, header, body)


def _duplicate_name(adapter: Path) -> None:
    header, body = _raw_header(adapter)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    _write_raw(adapter, ("{" + entry + ", " + text[1:]).encode(), body)


CORRUPTIONS = {
    # container
    "empty file": (lambda a: (a / "adapter_model.safetensors").write_bytes(b""), "too short"),
    "truncated": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:-1000]), "truncated"),
    "stray bytes appended": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes() + b"\0" * 8), "stray bytes"),
    "header length beyond the file": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 1 << 40) + b"{}"), "header"),
    "header is not JSON": (lambda a: _write_raw(a, b"\xff\xfe not json", b""), "corrupt header"),
    "header is a list": (lambda a: _write_raw(a, [1, 2], b""), "not a JSON object"),
    "duplicate tensor name": (_duplicate_name, "twice"),
    "overlapping tensors": (lambda a: _shift_first_offset(a, 4), "bytes"),
    "zeros instead of data": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\0" * 64), "header"),
    # values
    "NaN weights": (lambda a: _set_value(a, "A", 3, math.nan), "NaN"),
    "infinite weights": (lambda a: _set_value(a, "B", 0, -math.inf), "NaN or infinite"),
    "weights beyond float16's range": (lambda a: _set_value(a, "A", 0, 1e6), "magnitude"),
    "integer weights": (lambda a: rewrite_tensors(a, lambda t: t.update({first_tensor(t): t[first_tensor(t)].int()})),
                        "dtype"),
    # names and shapes
    "wrongly shaped (another base model)": (lambda a: rewrite_tensors(a, lambda t: t.__setitem__(
        first_tensor(t), torch.zeros(t[first_tensor(t)].shape[0], 64))), "shape"),
    "rank differs from the config": (lambda a: rewrite_tensors(a, lambda t: t.update(
        {k: (v[:4] if "lora_A" in k else v[:, :4]).contiguous() for k, v in t.items()})), "rank mismatch"),
    "a tensor missing": (lambda a: rewrite_tensors(a, lambda t: t.pop(first_tensor(t, "B"))), "missing"),
    "a projection the config does not list": (lambda a: rewrite_tensors(a, lambda t: t.update(
        {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(8, 1536),
         "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.zeros(576, 8)})), "does not list"),
    "a layer the model lacks": (lambda a: rewrite_tensors(a, lambda t: t.update(
        {"base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(8, 576)})), "layer 99"),
    "a non-LoRA tensor": (lambda a: rewrite_tensors(a, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})),
                          "unsupported tensor"),
    # the config beside the weights
    "rank above the pool": (lambda a: (a / "adapter_config.json").write_text(
        json.dumps({**json.loads((a / "adapter_config.json").read_text()), "r": 128})), "max_lora_rank"),
}


def _edit_config(change):  # type: ignore[no-untyped-def]
    def edit(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def _write_config(text: bytes):  # type: ignore[no-untyped-def]
    return lambda adapter: (adapter / "adapter_config.json").write_bytes(text)


# adapter_config.json broken in the ways PEFT never writes it.
CONFIG_CORRUPTIONS = {
    "rank as a word": (_edit_config(lambda c: {**c, "r": "eight"}), "'r' must be an integer"),
    "rank as a fraction": (_edit_config(lambda c: {**c, "r": 8.5}), "'r' must be an integer"),
    "rank zero": (_edit_config(lambda c: {**c, "r": 0}), "rank must be >= 1"),
    "alpha as a word": (_edit_config(lambda c: {**c, "lora_alpha": "big"}), "lora_alpha"),
    "config is a JSON list": (_edit_config(lambda c: [c]), "JSON object"),
    "config is a JSON string": (_edit_config(lambda c: "LORA"), "JSON object"),
    "target_modules as a regex": (_edit_config(lambda c: {**c, "target_modules": "q_proj|v_proj"}),
                                  "target_modules"),
    "target_modules empty": (_edit_config(lambda c: {**c, "target_modules": []}), "target_modules"),
    "rsLoRA flag as text": (_edit_config(lambda c: {**c, "use_rslora": "yes"}), "use_rslora"),
    "DoRA": (_edit_config(lambda c: {**c, "use_dora": True}), "DoRA"),
    "another PEFT method": (_edit_config(lambda c: {**c, "peft_type": "IA3"}), "peft_type"),
    "not JSON": (_write_config(b"{r: 8,"), "not valid JSON"),
    "binary garbage": (_write_config(bytes(range(256))), "not valid JSON"),
    "empty config": (_write_config(b""), "not valid JSON"),
    "no weights file": (lambda a: (a / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
}


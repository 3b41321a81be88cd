"""bench/memory.py: its computed bytes against known answers and against what the engine
really holds on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_computed_sizes_match_published_llama2_figures(memory) -> None:
    # Parameter counts of the Llama-2 checkpoints (their model cards / safetensors headers).
    assert memory.base_bytes(memory.LLAMA2_7B, None) == 2 * 6_738_415_616
    assert memory.base_bytes(memory.LLAMA2_13B, None) == 2 * 13_015_864_320
    assert memory.kv_bytes_per_token(memory.LLAMA2_7B) == 512 * 1024  # 2 x 32 layers x 4096 x fp16
    # 4-bit g128: half a byte per projection weight + 4 bytes per 128 (scale and zero, fp16).
    projections = memory.projection_weights(memory.LLAMA2_7B)
    assert memory.base_bytes(memory.LLAMA2_7B, 4) == projections * (0.5 + 4 / 128) + (6_738_415_616 - projections) * 2
    # One rank-16 adapter on all seven projections of Llama-2-7B: 16 x 32 x sum(in + out) x 2 bytes.
    assert memory.adapter_pool_bytes(memory.LLAMA2_7B, 1, 16) == 16 * 32 * (4 * 8192 + 3 * (4096 + 11008)) * 2


def test_measured_engine_bytes_equal_the_computed_ones(memory, model_dir, tmp_path) -> None:
    result = memory.main(["--adapters", "4", "--kv-tokens", "256", "--out", str(tmp_path)])
    assert [m["base"] for m in result["measured"]] == ["fp16", "4-bit"]
    for row in result["measured"]:
        computed = row["computed_bytes"]
        assert row["base_bytes"] == computed["base"], row["base"]
        assert row["kv_bytes"] == computed["kv"], row["base"]
        # The pool also holds each slot's rank and scale per projection slice (int32 + float32).
        extra = row["adapters_bytes"] - computed["adapters"]
        assert 0 <= extra <= 4 * 8 * 30 * 7, row["base"]
        assert 0 <= row["sampled_token"] < 49152  # the engine built that way runs a step
    fp16, four_bit = result["measured"]
    assert four_bit["base_bytes"] < 0.45 * fp16["base_bytes"]
    written = json.loads((tmp_path / "memory.json").read_text())
    assert {r["model"] for r in written["computed"]} == {model_dir.name, "Llama-2-7B", "Llama-2-13B"}
    assert (tmp_path / "memory.md").read_text().count("| Llama-2-13B |") == 4
    assert (tmp_path / "memory.png").stat().st_size > 10_000

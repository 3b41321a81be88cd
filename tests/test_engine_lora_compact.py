"""The CPU's compact LoRA copies (kernels/lora_compact_cpu.py) kept current across slot
loads: rewritten in place where a slot's new adapter fits its columns, rebuilt in full
otherwise. After every load the projection's output is checked against a float64
computation from the adapters loaded, and which of the two paths ran is checked too."""

from __future__ import annotations

import pytest
import torch

import inlaid.engine.lora as lora_module
from inlaid.engine.lora import LoraBatch, LoraLinear
from inlaid.kernels import lora_cpu
from inlaid.kernels.dispatch import lora_host_segments


@pytest.fixture(autouse=True)
def _torch_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check torch's CPU routes; the native kernel would take their steps
    (tests/test_kernels_lora_native.py checks it)."""
    monkeypatch.setattr(lora_cpu, "USE_NATIVE", False)


NAMES, WIDTHS, IN_FEATURES, SLOTS, MAX_RANK = ["q_proj", "k_proj", "v_proj"], [24, 8, 16], 40, 4, 16


def _adapter(rank: int, names: list[str], generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (torch.randn(rank, IN_FEATURES, generator=generator),
                   torch.randn(width, rank, generator=generator).to(torch.float16))  # stored fp16, as committed
            for name, width in zip(NAMES, WIDTHS) if name in names}


def _batch(token_slots: list[int]) -> LoraBatch:
    starts, slots = [0], []
    for token, slot in enumerate(token_slots):
        if slots and slots[-1] == slot:
            starts[-1] = token + 1
        else:
            slots.append(slot)
            starts.append(token + 1)
    starts_t, slots_t = torch.tensor(starts, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32)
    return LoraBatch(starts_t, slots_t, lora_host_segments(starts_t, slots_t, len(token_slots), SLOTS))


def _reference(weight: torch.Tensor, x: torch.Tensor, token_slots: list[int], loaded: dict) -> torch.Tensor:
    y = x.double() @ weight.double().T
    for token, slot in enumerate(token_slots):
        adapter, scale = loaded.get(slot, ({}, 0.0))
        for name, (a, b) in adapter.items():
            start = sum(WIDTHS[: NAMES.index(name)])
            y[token, start : start + b.shape[0]] += scale * (x[token].double() @ a.double().T) @ b.double().T
    return y


@pytest.mark.parametrize("seed", [0, 1])
def test_compact_copies_follow_every_slot_load(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)  # every step through the masked route
    outcomes: list[str] = []  # what each forward did to the compact copies
    update, build = lora_module.update_compact_slots, lora_module.build_compact_pools

    def recorded_update(*args):  # noqa: ANN002, ANN202
        updated = update(*args)
        outcomes.append("fallback" if updated is None else "in place")
        return updated

    def recorded_build(*args):  # noqa: ANN002, ANN202
        outcomes.append("built")
        return build(*args)

    monkeypatch.setattr(lora_module, "update_compact_slots", recorded_update)
    monkeypatch.setattr(lora_module, "build_compact_pools", recorded_build)
    generator = torch.Generator().manual_seed(seed)
    linear = LoraLinear(IN_FEATURES, WIDTHS, NAMES, bias=False)
    linear.weight.data = torch.randn(sum(WIDTHS), IN_FEATURES, generator=generator) / IN_FEATURES**0.5
    linear.allocate_lora(SLOTS, MAX_RANK, torch.float32, torch.device("cpu"))
    token_slots = sorted([slot for slot in range(-1, SLOTS) for _ in range(3)])
    batch_tokens = len(token_slots)
    loaded: dict[int, tuple[dict, float]] = {}
    # (slot, rank, slices, the path the next forward must take)
    plan = [(slot, 8, NAMES, "built") for slot in range(SLOTS)]  # first forward: one full build
    plan += [(1, 8, NAMES, "in place"),  # same rank: its columns rewritten
             (2, 4, NAMES, "in place"),  # smaller: 4 of its 8 columns per slice become padding (12 of 96)
             (3, 8, NAMES[:1], "fallback built"),  # k, v dropped: 28 of 96 columns padding > 1/4
             (0, 16, NAMES, "fallback built"),  # larger than its 8 columns
             (2, 0, [], "in place"),  # emptied: its 12 of 92 columns zeroed, scale 0
             (0, 0, [], "fallback built")]  # emptied: 48 + 12 of 92 columns would be padding
    for step, (slot, rank, names, expected) in enumerate(plan):
        scale = 0.5 + step / 4
        adapter = _adapter(rank, names, generator) if rank else {}
        linear.load_slot(slot, adapter, scale)
        loaded[slot] = (adapter, scale)
        if step < SLOTS - 1:
            continue  # the first loads all go into the first build
        outcomes.clear()
        x = torch.randn(batch_tokens, IN_FEATURES, generator=generator)
        y = linear(x, _batch(token_slots))
        assert " ".join(outcomes) == expected, (step, outcomes)
        torch.testing.assert_close(y.double(), _reference(linear.weight, x, token_slots, loaded), rtol=1e-5, atol=1e-5)
        outcomes.clear()
        linear(x, _batch(token_slots))  # nothing loaded since: the copies are reused as they are
        assert outcomes == []


def test_foreign_pool_write_between_loads_forces_a_full_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write to the pools that is not a `load_slot` (a benchmark filling them) must not be
    missed by an in-place update of the slots loaded around it."""
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)
    generator = torch.Generator().manual_seed(3)
    linear = LoraLinear(IN_FEATURES, WIDTHS, NAMES, bias=False)
    linear.weight.data = torch.randn(sum(WIDTHS), IN_FEATURES, generator=generator)
    linear.allocate_lora(SLOTS, MAX_RANK, torch.float32, torch.device("cpu"))
    loaded = {slot: (_adapter(8, NAMES, generator), 1.0) for slot in range(SLOTS)}
    for slot, (adapter, scale) in loaded.items():
        linear.load_slot(slot, adapter, scale)
    token_slots = sorted(list(range(SLOTS)) * 2)
    x = torch.randn(len(token_slots), IN_FEATURES, generator=generator)
    linear(x, _batch(token_slots))
    linear.load_slot(1, loaded[1][0], 1.0)
    linear.lora_a[0][2, :8].mul_(3.0)  # the foreign write, to slot 2
    a, b = loaded[2][0]["q_proj"]
    loaded[2][0]["q_proj"] = (a * 3.0, b)
    linear.load_slot(3, loaded[3][0], 1.0)
    y = linear(x, _batch(token_slots))
    torch.testing.assert_close(y.double(), _reference(linear.weight, x, token_slots, loaded), rtol=1e-5, atol=1e-5)

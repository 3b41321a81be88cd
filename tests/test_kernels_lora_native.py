"""The native CPU LoRA kernel (kernels/lora_native.c) against the float64 shrink/expand
references, on fresh random inputs; pool rows past each slot's rank and the pools of slots
no token uses are NaN-poisoned (the kernel must read neither); how lora_apply splits a step
between it and torch's per-adapter route; its refusals; the float16 copies of the pools it
reads for float16 adapters (bit-identical to the float32 pools, stale copies dropped)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from inlaid.kernels import lora_cpu
from inlaid.kernels.dispatch import lora_apply, lora_host_segments
from inlaid.kernels.lora_meta import LoraArgumentError
from inlaid.kernels.lora_native import (
    HalfPools,
    NativeLoraPools,
    lora_apply_native,
    native_half_copies_worth_it,
    native_lora_available,
    native_lora_fits,
    native_lora_unavailable_reason,
)
from inlaid.kernels.lora_reference import lora_expand_reference, lora_shrink_reference
from inlaid.kernels.testing import LoraCase, random_lora_case, stacked_pools

pytestmark = pytest.mark.skipif(not native_lora_available(),
                                reason=f"native LoRA kernel not built here: {native_lora_unavailable_reason()}")

RANKS = [[8, 16, 32, 64, 16, 8, 4], [16, 64, 8, 32, 0, 16, 4], [32, 8, 0, 16, 64, 64, 4]]  # slot 6: unused
CASES = {  # requests [(slot, tokens)] back to back, -1 = no adapter
    "decode": [(s % 6, 1) for s in range(13)] + [(-1, 1), (2, 1)],
    "chunks": [(1, 0), (0, 3), (-1, 2), (4, 0), (2, 5), (5, 7), (0, 2)],
    "one_adapter": [(3, 9)],
    "no_adapter": [(-1, 4)],
    "no_tokens": [],
}


def reference(case: LoraCase, y_before: torch.Tensor) -> torch.Tensor:
    v = lora_shrink_reference(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    return lora_expand_reference(y_before, v, case.b_pools, case.slice_offsets, case.segment_starts,
                                 case.segment_slots, case.slot_ranks, case.slot_scales)


def token_slots(case: LoraCase) -> torch.Tensor:
    lengths = (case.segment_starts[1:] - case.segment_starts[:-1]).long()
    return torch.repeat_interleave(case.segment_slots.long(), lengths)


def poison_unused_slots(case: LoraCase, stacked: torch.Tensor, b_views: list[torch.Tensor]) -> None:
    used = set(token_slots(case).tolist())
    for slot in range(stacked.shape[0]):
        if slot not in used:
            stacked[slot] = float("nan")
            for b in b_views:
                b[slot] = float("nan")


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("in_features,widths", [(40, [32, 16, 24]), (600, [576]), (64, [20, 1536])])
def test_native_kernel_equals_float64_reference(name: str, in_features: int, widths: list[int]) -> None:
    """K and N with and without a 16-float tail, 1-3 slices, ranks 0..64 of R = 64; tokens
    with no adapter and columns of a slice whose rank is 0 stay bit-identical."""
    ranks = [RANKS[i % 3] for i in range(len(widths))]
    for seed in range(2):
        case = random_lora_case(CASES[name], ranks, in_features, widths, 64, seed=seed + in_features)
        stacked, _, b_views = stacked_pools(case, zero_padding=False)  # NaN past every rank
        poison_unused_slots(case, stacked, b_views)
        y = torch.randn(case.num_tokens, sum(widths))
        y_before = y.clone()
        lora_apply_native(y, case.x, stacked, b_views, case.slice_offsets, token_slots(case), case.slot_ranks,
                          case.slot_scales)
        want = reference(case, y_before)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        untouched = want == y_before.double()
        assert torch.equal(y.double()[untouched], y_before.double()[untouched])


def test_lora_apply_sends_small_groups_native_and_large_ones_to_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """One step mixing decode tokens and an adapter with a long chunk: the long group takes
    torch's per-adapter route (its rows are -1 for the kernel), the rest the kernel; together
    equal to the reference. With the kernel switched off, the same result from torch."""
    large = lora_cpu.NATIVE_MAX_GROUP_TOKENS
    requests = [(0, 1), (1, 1), (2, large + 3), (3, 1), (-1, 2), (4, 2)]
    case = random_lora_case(requests, [r[:6] for r in RANKS], 48, [24, 8, 40], 64, seed=5)
    stacked, a_views, b_views = stacked_pools(case)  # torch's stacked routes read whole rows: zero past ranks
    segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 6)
    calls = []
    real = lora_cpu.lora_apply_native

    def recorded(y, x, stacked_a, b_pools, offsets, slots, ranks, scales):  # type: ignore[no-untyped-def]
        calls.append(slots.clone())
        real(y, x, stacked_a, b_pools, offsets, slots, ranks, scales)

    monkeypatch.setattr(lora_cpu, "lora_apply_native", recorded)
    results = []
    for native in (True, False):
        monkeypatch.setattr(lora_cpu, "USE_NATIVE", native)
        y = torch.randn(case.num_tokens, 72, generator=torch.Generator().manual_seed(1))
        y_before = y.clone()
        lora_apply(y, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots,
                   case.slot_ranks, case.slot_scales, segments=segments, stacked_a=stacked)
        torch.testing.assert_close(y.double(), reference(case, y_before), rtol=1e-4, atol=1e-4)
        results.append(y)
    assert len(calls) == 1  # the kernel ran once, with the long group's rows skipped
    expected = token_slots(case).clone()
    expected[expected == 2] = -1
    assert torch.equal(calls[0], expected)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_native_kernel_refuses_what_it_cannot_take() -> None:
    case = random_lora_case([(0, 2), (1, 1)], [[8, 16]], 32, [16], 16, seed=3)
    stacked, _, b_views = stacked_pools(case)
    slots, y = token_slots(case), torch.zeros(3, 16)
    assert not native_lora_fits(y, case.x.bfloat16(), stacked, b_views)
    assert not native_lora_fits(y, case.x, None, b_views)
    with pytest.raises(LoraArgumentError, match="float32"):
        lora_apply_native(y, case.x.bfloat16(), stacked, b_views, [0], slots, case.slot_ranks, case.slot_scales)
    with pytest.raises(LoraArgumentError, match="refused"):  # a rank past the pools' R = 16
        lora_apply_native(y, case.x, stacked, b_views, [0], slots, torch.tensor([[8, 17]], dtype=torch.int32),
                          case.slot_scales)
    with pytest.raises(LoraArgumentError, match="refused"):  # a slot past the pools
        lora_apply_native(y, case.x, stacked, b_views, [0], torch.tensor([0, 0, 2]), case.slot_ranks,
                          case.slot_scales)
    with pytest.raises(LoraArgumentError, match="past y"):
        lora_apply_native(y, case.x, stacked, b_views, [8], slots, case.slot_ranks, case.slot_scales)
    assert torch.equal(y, torch.zeros(3, 16))  # nothing written by a refused call


def test_pools_bound_once_follow_in_place_slot_loads() -> None:
    """A `NativeLoraPools` bound before a slot's weights, rank and scale are rewritten in place
    (what an adapter load does) computes with the new ones; through lora_apply with the step's
    segments it gives the reference; bound to other pools it is refused."""
    case = random_lora_case(CASES["decode"], RANKS, 40, [32, 16, 24], 64, seed=11)
    stacked, a_views, b_views = stacked_pools(case)
    ranks, scales = case.slot_ranks.clone(), case.slot_scales.clone()
    native = NativeLoraPools(stacked, b_views, case.slice_offsets, ranks, scales)
    generator = torch.Generator().manual_seed(4)
    for round_ in range(2):
        if round_:  # "load" another adapter of rank 16 into slot 2, in place
            for i in range(3):
                stacked[2, i * 64 : i * 64 + 16] = torch.randn(16, 40, generator=generator)
                stacked[2, i * 64 + 16 : (i + 1) * 64] = 0
                b_views[i][2, :, :16] = torch.randn(b_views[i].shape[1], 16, generator=generator)
                b_views[i][2, :, 16:] = 0
            ranks[:, 2] = 16
            scales[:, 2] = 0.75
        want_case = replace(case, a_pools=a_views, b_pools=b_views, slot_ranks=ranks, slot_scales=scales)
        y = torch.randn(case.num_tokens, 72)
        y_before = y.clone()
        native.apply(y, case.x, token_slots(case))
        torch.testing.assert_close(y.double(), reference(want_case, y_before), rtol=1e-5, atol=1e-5)
        segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, stacked.shape[0])
        y_dispatch = y_before.clone()
        lora_apply(y_dispatch, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots,
                   ranks, scales, segments=segments, stacked_a=stacked, native=native)
        torch.testing.assert_close(y_dispatch, y, rtol=0, atol=0)
    with pytest.raises(LoraArgumentError, match="other pools"):
        lora_apply(y, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots, ranks,
                   scales, segments=segments, stacked_a=stacked.clone(), native=native)
    with pytest.raises(LoraArgumentError, match="int32"):  # a converted copy would miss later loads
        NativeLoraPools(stacked, b_views, case.slice_offsets, ranks.long(), scales)


def test_pools_the_kernel_cannot_take_keep_torchs_routes() -> None:
    """A projection whose pools are wider than the kernel's MAX_RANK (max_lora_rank 300) is
    served by torch's routes, not refused: the output equals the float64 base + LoRA."""
    from inlaid.engine.lora import LoraBatch, LoraLinear

    generator = torch.Generator().manual_seed(6)
    linear = LoraLinear(40, [24, 8], ["q_proj", "k_proj"], bias=False)
    linear.weight.data = torch.randn(32, 40, generator=generator)
    linear.allocate_lora(2, 300, torch.float32, torch.device("cpu"))
    adapter = {"q_proj": (torch.randn(4, 40, generator=generator), torch.randn(24, 4, generator=generator)),
               "k_proj": (torch.randn(4, 40, generator=generator), torch.randn(8, 4, generator=generator))}
    linear.load_slot(1, adapter, 0.5)
    starts, slots = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([-1, 1], dtype=torch.int32)
    batch = LoraBatch(starts, slots, lora_host_segments(starts, slots, 3, 2))
    x = torch.randn(3, 40, generator=generator)
    want = x.double() @ linear.weight.double().T
    for name, offset in (("q_proj", 0), ("k_proj", 24)):
        a, b = adapter[name]
        want[1:, offset : offset + b.shape[0]] += 0.5 * (x[1:].double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(linear(x, batch).double(), want, rtol=1e-5, atol=1e-5)
    assert linear._native is None


def half_copies(stacked: torch.Tensor, b_views: list[torch.Tensor], flagged: list[int]) -> HalfPools:
    """float16 copies of the pools with `flagged` slots set; every other slot's copies are
    NaN-poisoned (the kernel must read their float32 pools)."""
    half = HalfPools.like(stacked, b_views)
    half.stacked_a.copy_(stacked.half())
    for h, b in zip(half.b_pools, b_views):
        h.copy_(b.half())
    for slot in range(stacked.shape[0]):
        if slot in flagged:
            half.slot_half[slot] = 1
        else:
            half.stacked_a[slot] = float("nan")
            for h in half.b_pools:
                h[slot] = float("nan")
    return half


@pytest.mark.parametrize("name", ["decode", "chunks"])
@pytest.mark.parametrize("in_features,widths", [(40, [32, 16, 24]), (600, [576])])
def test_half_copies_give_the_float32_pools_bits(name: str, in_features: int, widths: list[int]) -> None:
    """Pools whose values are float16 (an adapter stored in float16): slots read from the
    float16 copies (their float32 pools NaN-poisoned) give bit for bit what the float32 pools
    give; slots not flagged read the float32 pools (their copies NaN-poisoned); both equal the
    float64 reference."""
    ranks = [RANKS[i % 3] for i in range(len(widths))]
    case = random_lora_case(CASES[name], ranks, in_features, widths, 64, seed=21 + in_features)
    case = replace(case, a_pools=[a.half().float() for a in case.a_pools], b_pools=[b.half().float() for b in case.b_pools])
    stacked, _, b_views = stacked_pools(case, zero_padding=False)
    y = torch.randn(case.num_tokens, sum(widths))
    want_bits = y.clone()
    lora_apply_native(want_bits, case.x, stacked, b_views, case.slice_offsets, token_slots(case), case.slot_ranks,
                      case.slot_scales)
    flagged = [0, 2, 3, 5]
    half = half_copies(stacked, b_views, flagged)
    for slot in flagged:
        stacked[slot] = float("nan")
        for b in b_views:
            b[slot] = float("nan")
    got = y.clone()
    lora_apply_native(got, case.x, stacked, b_views, case.slice_offsets, token_slots(case), case.slot_ranks,
                      case.slot_scales, half)
    assert torch.equal(got, want_bits)
    torch.testing.assert_close(got.double(), reference(case, y), rtol=1e-5, atol=1e-5)


def test_half_copies_of_another_shape_are_refused() -> None:
    case = random_lora_case([(0, 2), (1, 1)], [[8, 16]], 32, [16], 16, seed=3)
    stacked, _, b_views = stacked_pools(case)
    half = HalfPools.like(stacked, b_views)
    for broken in (replace(half, stacked_a=half.stacked_a.float()), replace(half, slot_half=half.slot_half[:1]),
                   replace(half, b_pools=[torch.zeros(2, 16, 16, dtype=torch.float16)])):
        with pytest.raises(LoraArgumentError, match="float16 copies"):
            NativeLoraPools(stacked, b_views, [0], case.slot_ranks, case.slot_scales, broken)


@pytest.mark.skipif(not native_half_copies_worth_it(), reason="float16 copies not used here (no AVX-512)")
def test_engine_reads_float16_adapters_from_copies_and_drops_stale_ones() -> None:
    """A LoraLinear makes the copies only when a float16 adapter loads (a float32 one leaves
    it without them, and their memory unspent), rebinding the kernel to them; it loads a
    float16 adapter into the copies (flag set) and a float32 one into the float32 pools only;
    decode tokens of both equal the float64 base + LoRA; a write to the pools by anything but
    `load_slot` drops the flags (the copies would be stale)."""
    from inlaid.engine.lora import LoraBatch, LoraLinear

    generator = torch.Generator().manual_seed(8)
    linear = LoraLinear(48, [32, 16], ["q_proj", "k_proj"], bias=False)
    linear.weight.data = torch.randn(48, 48, generator=generator)
    linear.allocate_lora(3, 16, torch.float32, torch.device("cpu"))
    assert linear.half_pools is None

    def adapter(rank: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: ((torch.randn(rank, 48, generator=generator) / 7).to(dtype),
                       (torch.randn(width, rank, generator=generator) / 4).to(dtype))
                for name, width in (("q_proj", 32), ("k_proj", 16))}

    adapters = {1: (adapter(8, torch.float16), 0.5), 2: (adapter(16, torch.float32), 2.0)}
    starts = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    slots = torch.tensor([1, 2, -1, 1], dtype=torch.int32)
    batch = LoraBatch(starts, slots, lora_host_segments(starts, slots, 4, 3))
    x = torch.randn(4, 48, generator=generator)
    linear.load_slot(2, *adapters[2])
    linear(x, batch)  # binds the kernel to the pools, without copies yet
    assert linear.half_pools is None and linear._native is not None
    linear.load_slot(1, *adapters[1])
    assert linear.half_pools is not None
    assert linear.half_pools.slot_half.tolist() == [0, 1, 0]

    def want() -> torch.Tensor:
        expected = x.double() @ linear.weight.double().T
        for row, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            weights, scale = adapters[slot]
            for name, offset in (("q_proj", 0), ("k_proj", 32)):
                a, b = weights[name]
                expected[row, offset : offset + b.shape[0]] += scale * (x[row].double() @ a.double().T) @ b.double().T
        return expected

    torch.testing.assert_close(linear(x, batch).double(), want(), rtol=1e-5, atol=1e-5)
    assert linear._native._half_arguments[0] == linear.half_pools.stacked_a.data_ptr()  # rebound to the copies
    linear.half_pools.stacked_a[1] = float("nan")  # what a stale copy would hold
    linear.stacked_a[0, 0, 0] = 0.0  # a write outside load_slot
    torch.testing.assert_close(linear(x, batch).double(), want(), rtol=1e-5, atol=1e-5)
    assert linear.half_pools.slot_half.tolist() == [0, 0, 0]


@pytest.mark.skipif(not native_half_copies_worth_it(), reason="float16 copies not used here (no AVX-512)")
def test_an_engine_holds_float16_copies_only_where_a_float16_adapter_loaded(model_dir, adapter_dirs, tmp_path) -> None:
    """The copies cost half the pools again: a float32 adapter leaves an engine without them,
    and a float16 one of q_proj/v_proj gives them to the attention's q|k|v projections only;
    `engine_memory` counts exactly the copies made."""
    from safetensors.torch import load_file, save_file

    from inlaid.engine.config import EngineConfig
    from inlaid.engine.engine import Engine
    from inlaid.engine.lora import LoraLinear
    from inlaid.engine.memory import engine_memory
    from inlaid.engine.sequence import SamplingParams

    half = tmp_path / "attn-half"
    half.mkdir()
    (half / "adapter_config.json").write_text((adapter_dirs["attn-r8"] / "adapter_config.json").read_text())
    weights = load_file(str(adapter_dirs["attn-r8"] / "adapter_model.safetensors"))
    save_file({name: tensor.half() for name, tensor in weights.items()}, str(half / "adapter_model.safetensors"))
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), max_lora_slots=2, max_lora_rank=8, num_kv_blocks=16))
    engine.register_adapter("full", str(adapter_dirs["attn-r8"]))
    engine.register_adapter("half", str(half))
    modules = {name: module for name, module in engine.runner.model.named_modules() if isinstance(module, LoraLinear)}

    def copies_after(adapter: str) -> int:
        engine.generate(["Hello"], SamplingParams(max_tokens=1), [adapter])
        memory = engine_memory(engine.runner)
        counted = sum(pool.numel() * pool.element_size() for module in modules.values() if module.half_pools
                      for pool in (module.half_pools.stacked_a, *module.half_pools.b_pools,
                                   module.half_pools.slot_half))
        assert memory.lora_half_copies == counted
        return counted

    assert copies_after("full") == 0 and all(module.half_pools is None for module in modules.values())
    assert copies_after("half") > 0
    assert {name for name, module in modules.items() if module.half_pools is not None} == {
        name for name in modules if name.endswith("qkv_proj")}

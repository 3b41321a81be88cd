"""Segmented LoRA shrink/expand: the CPU path (dispatch) and the Triton kernels (interpreted on
the CPU) against the float64 per-segment reference, on fresh random inputs.

Poisoning: the pools' padded ranks are NaN, the shrink output buffer starts as NaN, and the
expand input `v` is NaN wherever the contract leaves it undefined; so reading padding,
skipping a token, or writing a token without adapter shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inlaid.kernels.interpret import enable_triton_interpreter
from inlaid.kernels.lora_meta import LoraArgumentError, build_lora_segments
from inlaid.kernels.lora_reference import lora_expand_reference, lora_shrink_reference
from inlaid.kernels.testing import LoraCase, random_lora_case, stacked_pools

INTERPRETED_HERE = enable_triton_interpreter()
if INTERPRETED_HERE:
    from inlaid.kernels import lora_triton
from inlaid.kernels import lora_cpu, lora_cpu_plan
from inlaid.kernels.dispatch import build_compact_pools, lora_apply, lora_expand, lora_host_segments, lora_shrink
from inlaid.kernels.lora_compact_cpu import lora_apply_compact


@pytest.fixture(autouse=True)
def _torch_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check torch's CPU routes; the native kernel would take their steps
    (tests/test_kernels_lora_native.py checks it)."""
    monkeypatch.setattr(lora_cpu, "USE_NATIVE", False)


needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_HERE, reason="triton already loaded in compiled mode: run in a child process"
)

# (requests [(slot, tokens)], ranks per slice [n_slices][S]) -- S = 6 slots, R_max = 64.
MIXED_RANKS = [[8, 16, 32, 64, 16, 8], [16, 64, 8, 32, 0, 16], [32, 8, 0, 16, 64, 64]]
CASES = {
    "one_segment": ([(3, 21)], MIXED_RANKS),
    "decode_length_1": ([(s % 6, 1) for s in range(13)] + [(-1, 1), (2, 1)], MIXED_RANKS),
    "empty_segments": ([(1, 0), (0, 3), (-1, 2), (4, 0), (2, 5), (5, 0)], MIXED_RANKS),
    "repeated_slot_and_long": ([(0, 2), (1, 19), (0, 3), (-1, 4), (1, 1), (3, 17)], MIXED_RANKS),
    "no_adapter_at_all": ([(-1, 5)], MIXED_RANKS),
    "no_tokens": ([], MIXED_RANKS),  # a step whose rows all take another route
}
WIDTHS = [32, 16, 24]  # fused projection: three slices of different widths


def make_case(name: str, k: int, dtype: torch.dtype = torch.float32, capacity_pad: int = 0, seed: int = 0) -> LoraCase:
    requests, ranks = CASES[name]
    capacity = None if capacity_pad == 0 else len(requests) + capacity_pad
    return random_lora_case(requests, ranks, k, WIDTHS, 64, dtype=dtype, capacity=capacity, seed=seed)


def assert_shrink_matches(case: LoraCase, v: torch.Tensor, atol: float) -> None:
    ref = lora_shrink_reference(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    mask = case.defined_mask()
    got = v.detach().cpu().double()[mask]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref[mask], rtol=atol, atol=atol)


def poisoned_v(case: LoraCase) -> torch.Tensor:
    """The float64 shrink reference as float32, NaN where the contract leaves v undefined."""
    ref = lora_shrink_reference(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    return torch.where(case.defined_mask(), ref, torch.nan).float()


def assert_expand_matches(case: LoraCase, y_before: torch.Tensor, y_after: torch.Tensor, v: torch.Tensor, atol: float) -> None:
    ref = lora_expand_reference(
        y_before, v, case.b_pools, case.slice_offsets, case.segment_starts,
        case.segment_slots, case.slot_ranks, case.slot_scales,
    )
    got = y_after.detach().cpu().double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=atol, atol=atol)
    untouched = ref == y_before.double()  # no adapter on this (token, slice): must stay bit-identical
    assert torch.equal(got[untouched], y_before.double()[untouched])


# ----------------------------------------------------------------- CPU path (through dispatch)

@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("capacity_pad", [0, 3])
def test_cpu_shrink_and_expand_match_reference(name: str, capacity_pad: int) -> None:
    case = make_case(name, k=48, capacity_pad=capacity_pad, seed=len(name) + capacity_pad)
    out = torch.full((3, case.num_tokens, 64), torch.nan)
    v = lora_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks, out=out)
    assert v.data_ptr() == out.data_ptr()
    assert_shrink_matches(case, v, atol=1e-5)
    v_in = poisoned_v(case)
    y = torch.randn((case.num_tokens, sum(WIDTHS)))
    y_before = y.clone()
    lora_expand(y, v_in, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                case.slot_ranks, case.slot_scales)
    assert_expand_matches(case, y_before, y, v_in, atol=1e-5)


def test_cpu_large_groups_and_padded_groups_in_one_step() -> None:
    """Slots above and below LARGE_GROUP_TOKENS take different routes inside one call."""
    requests = [(0, lora_cpu_plan.LARGE_GROUP_TOKENS + 5), (1, 2), (2, 1), (0, 3), (3, lora_cpu_plan.LARGE_GROUP_TOKENS)]
    ranks = [[16, 16, 8, 64], [8, 32, 16, 16]]
    case = random_lora_case(requests, ranks, 40, [24, 8], 64, seed=7)
    y = torch.randn((case.num_tokens, 32))
    y_before = y.clone()
    v = lora_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    assert_shrink_matches(case, v, atol=1e-5)
    lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
               case.segment_slots, case.slot_ranks, case.slot_scales)
    assert_expand_matches(case, y_before, y, poisoned_v(case), atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("route", ["masked", "per_adapter"])
def test_cpu_stacked_routes_match_reference(name: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's CPU routes (host segments built once, A pools stacked, B stored [S, R, N]):
    the masked all-slots route and the per-adapter route, against the float64 reference."""
    threshold = 10**9 if route == "masked" else 0
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", threshold)
    for seed in range(3):
        case = make_case(name, k=40, seed=100 + seed)
        stacked, a_views, b_views = stacked_pools(case)
        segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 6)
        if route == "masked" and len(segments.slot_rows) > 1:
            assert segments.masked_path
        y = torch.randn((case.num_tokens, sum(WIDTHS)))
        y_before = y.clone()
        lora_apply(y, case.x, a_views, b_views, case.slice_offsets, case.segment_starts, case.segment_slots,
                   case.slot_ranks, case.slot_scales, segments=segments, stacked_a=stacked)
        assert_expand_matches(case, y_before, y, poisoned_v(case), atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_compact_route_matches_reference(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked route on the compact pools (real ranks only) against the float64
    reference. The pools keep their NaN poison past each rank: compacting must not read it.
    (Taken here whatever share of the loaded slots the step uses: the next test covers the choice.)"""
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)
    monkeypatch.setattr(lora_cpu, "COMPACT_MIN_ACTIVE_SHARE", 0.0)
    taken = []
    monkeypatch.setattr(lora_cpu, "lora_apply_compact", lambda *args: (taken.append(1), lora_apply_compact(*args)))
    for seed in range(3):
        case = make_case(name, k=40, seed=200 + seed)
        stacked, _, b_views = stacked_pools(case, zero_padding=False)  # the NaN poison past each rank kept
        compact = build_compact_pools(stacked, b_views, case.slot_ranks, case.slot_scales)
        assert compact.num_columns == int(case.slot_ranks.sum())
        segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 6)
        y = torch.randn((case.num_tokens, sum(WIDTHS)))
        y_before = y.clone()
        lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
                   case.segment_slots, case.slot_ranks, case.slot_scales, segments=segments, compact=compact)
        assert_expand_matches(case, y_before, y, poisoned_v(case), atol=1e-4)
    slots_with_tokens = {slot for slot, tokens in CASES[name][0] if slot >= 0 and tokens > 0}
    assert bool(taken) == (len(slots_with_tokens) > 1)  # the route serves steps of several adapters


@pytest.mark.parametrize("name", ["decode_length_1", "empty_segments", "repeated_slot_and_long"])
def test_cpu_compact_route_only_while_the_step_uses_most_loaded_slots(name: str, monkeypatch) -> None:
    """The compact masked route multiplies every loaded slot's columns: it is taken only while
    the step's own slots hold COMPACT_MIN_ACTIVE_SHARE of them, else the per-adapter route reads
    just those; both against the float64 reference, the NaN poison past each rank kept."""
    monkeypatch.setattr(lora_cpu, "DENSE_MAX_TOKEN_SLOTS", 10**9)
    taken = []
    monkeypatch.setattr(lora_cpu, "lora_apply_compact", lambda *args: (taken.append(1), lora_apply_compact(*args)))
    case = make_case(name, k=40, seed=300)
    stacked, _, b_views = stacked_pools(case, zero_padding=False)
    compact = build_compact_pools(stacked, b_views, case.slot_ranks, case.slot_scales)
    segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 6)
    used = {slot for slot, _ in segments.slot_rows}
    share = sum(int(case.slot_ranks[:, slot].sum()) for slot in used) / compact.num_columns
    assert share == lora_cpu.active_column_share(compact, segments)
    y = torch.randn((case.num_tokens, sum(WIDTHS)))
    y_before = y.clone()
    lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
               case.segment_slots, case.slot_ranks, case.slot_scales, segments=segments, compact=compact)
    assert_expand_matches(case, y_before, y, poisoned_v(case), atol=1e-4)
    assert bool(taken) == (len(used) > 1 and share >= lora_cpu.COMPACT_MIN_ACTIVE_SHARE), (share, used)


def test_cpu_compact_pools_layout() -> None:
    """Each slice's columns are one range; each column holds its slot's A row, B column and scale."""
    case = make_case("decode_length_1", k=16, seed=5)
    stacked, _, b_views = stacked_pools(case, zero_padding=False)
    compact = build_compact_pools(stacked, b_views, case.slot_ranks, case.slot_scales)
    column = 0
    for i, ranks in enumerate(case.slot_ranks.tolist()):
        start, stop = compact.slice_columns[i]
        assert (start, stop) == (column, column + sum(ranks))
        for slot, rank in enumerate(ranks):
            rows = slice(column, column + rank)
            assert torch.equal(compact.a_rows[rows], case.a_pools[i][slot, :rank])
            assert torch.equal(compact.b_rows[i][column - start : column - start + rank], case.b_pools[i][slot, :, :rank].T)
            assert compact.col_slot[rows].tolist() == [slot] * rank
            assert torch.all(compact.col_scale[rows] == case.slot_scales[i, slot])
            column += rank
    assert torch.isfinite(compact.a_rows).all() and all(torch.isfinite(b).all() for b in compact.b_rows)


def test_cpu_stacked_a_must_be_the_pools_storage() -> None:
    case = make_case("decode_length_1", k=16)
    stacked, a_views, b_views = stacked_pools(case)
    y = torch.zeros((case.num_tokens, sum(WIDTHS)))
    with pytest.raises(LoraArgumentError, match="not the view"):
        lora_apply(y, case.x, [a.clone() for a in a_views], b_views, case.slice_offsets, case.segment_starts,
                   case.segment_slots, case.slot_ranks, case.slot_scales, stacked_a=stacked)
    segments = lora_host_segments(case.segment_starts, case.segment_slots, case.num_tokens, 6)
    with pytest.raises(LoraArgumentError, match="segments cover"):
        lora_apply(y[:-1], case.x[:-1], a_views, b_views, case.slice_offsets, case.segment_starts,
                   case.segment_slots, case.slot_ranks, case.slot_scales, segments=segments, stacked_a=stacked)


def test_cpu_bf16_pools() -> None:
    case = make_case("repeated_slot_and_long", k=64, dtype=torch.bfloat16, seed=3)
    y = torch.randn((case.num_tokens, sum(WIDTHS))).to(torch.bfloat16)
    y_before = y.clone()
    lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, case.segment_starts,
               case.segment_slots, case.slot_ranks, case.slot_scales)
    assert_expand_matches(case, y_before, y, poisoned_v(case), atol=6e-2)


def test_build_lora_segments_merges_neighbours_and_pads() -> None:
    starts, slots = build_lora_segments([2, 2, -1, 5, 5, 2], [3, 1, 2, 0, 4, 1], capacity=6)
    assert starts.tolist() == [0, 4, 6, 10, 11, 11, 11]
    assert slots.tolist() == [2, -1, 5, 2, -1, -1]
    with pytest.raises(LoraArgumentError, match="capacity"):
        build_lora_segments([0, 1, 2], [1, 1, 1], capacity=2)


def test_bad_arguments_raise_clear_errors() -> None:
    case = make_case("decode_length_1", k=16)
    args = (case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    with pytest.raises(LoraArgumentError, match="a_pools"):
        lora_shrink(case.x[:, :8], *args)
    with pytest.raises(LoraArgumentError, match="int32"):
        lora_shrink(case.x, case.a_pools, case.segment_starts.long(), case.segment_slots, case.slot_ranks)
    bad_starts = case.segment_starts.clone()
    bad_starts[-1] -= 1
    with pytest.raises(LoraArgumentError, match="from 0 to T"):
        lora_shrink(case.x, case.a_pools, bad_starts, case.segment_slots, case.slot_ranks)
    bad_slots = case.segment_slots.clone()
    bad_slots[0] = 6
    with pytest.raises(LoraArgumentError, match="segment_slots"):
        lora_shrink(case.x, case.a_pools, case.segment_starts, bad_slots, case.slot_ranks)
    with pytest.raises(LoraArgumentError, match="R_max"):
        lora_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks + 64)
    v = lora_shrink(case.x, *args)
    y = torch.zeros((case.num_tokens, sum(WIDTHS)))
    with pytest.raises(LoraArgumentError, match="does not fit"):
        lora_expand(y[:, :40], v, case.b_pools, case.slice_offsets, case.segment_starts,
                    case.segment_slots, case.slot_ranks, case.slot_scales)


# ------------------------------------------------------ Triton kernels under TRITON_INTERPRET=1

TRITON_CASES = ["one_segment", "decode_length_1", "empty_segments", "repeated_slot_and_long", "no_tokens"]


@needs_interpreter
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_interp_shrink_matches_reference(name: str) -> None:
    case = make_case(name, k=32, capacity_pad=2, seed=11 + len(name))
    split_k = 2 if name == "decode_length_1" else 1  # the atomic split-K path and the plain store
    out = torch.full((3, case.num_tokens, 64), torch.nan)
    lora_triton.sgmv_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks,
                            out, block_m=16, block_r=16, block_k=16, split_k=split_k)
    assert_shrink_matches(case, out, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_interp_expand_matches_reference(name: str) -> None:
    case = make_case(name, k=32, capacity_pad=2, seed=23 + len(name))
    v = poisoned_v(case)
    y = torch.randn((case.num_tokens, sum(WIDTHS)))
    y_before = y.clone()
    lora_triton.sgmv_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                            case.slot_ranks, case.slot_scales, block_m=16, block_n=16, block_r=16)
    assert_expand_matches(case, y_before, y, v, atol=1e-5)


@needs_interpreter
def test_triton_interp_fp16_default_configs() -> None:
    """The launchers' default tile configs with half-precision pools, as on the GPU."""
    case = make_case("repeated_slot_and_long", k=64, dtype=torch.float16, seed=5)
    out = torch.full((3, case.num_tokens, 64), torch.nan)
    lora_triton.sgmv_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks, out)
    assert_shrink_matches(case, out, atol=2e-2)
    y = torch.randn((case.num_tokens, sum(WIDTHS))).to(torch.float16)
    y_before = y.clone()
    v = poisoned_v(case)
    lora_triton.sgmv_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts,
                            case.segment_slots, case.slot_ranks, case.slot_scales)
    assert_expand_matches(case, y_before, y, v, atol=2e-2)


@needs_interpreter
def test_triton_interp_fp16_products_past_float16s_range() -> None:
    """x @ A ~ 1.5e5 (> 65504) with y ~ 400: the expand cast v to float16 (inf) before its dot."""
    gen = torch.Generator().manual_seed(9)
    rank, k, n = 4, 1024, 16
    x = (100 + torch.rand((3, k), generator=gen)).half()
    a_pool = (1 + torch.rand((2, rank, k), generator=gen)).half()
    b_pool = (2e-4 * (1 + torch.rand((2, n, rank), generator=gen))).half()
    starts, slots = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
    ranks, scales = torch.full((1, 2), rank, dtype=torch.int32), torch.tensor([[0.5, 1.0]])
    v = torch.full((1, 3, rank), torch.nan)
    lora_triton.sgmv_shrink(x, [a_pool], starts, slots, ranks, v)
    y = torch.randn((3, n), generator=gen).half()
    want = y.double().clone()
    for t, slot in enumerate([1, 1, 0]):
        v_exact = x[t].double() @ a_pool[slot].double().T
        torch.testing.assert_close(v[0, t].double(), v_exact, rtol=1e-5, atol=0)
        want[t] += float(scales[0, slot]) * (v_exact @ b_pool[slot].double().T)
    lora_triton.sgmv_expand(y, v, [b_pool], [0], starts, slots, ranks, scales)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=1e-2)


def test_triton_interp_in_child_process() -> None:
    """Where triton was already imported in compiled mode, interpret the kernels in a child."""
    if INTERPRETED_HERE:
        pytest.skip("the interpreted tests ran in this process")
    from inlaid.kernels.testing import check_interpreted_in_child

    check_interpreted_in_child(str(Path(__file__)))


@needs_interpreter
@pytest.mark.parametrize("requests,block_m", [
    ([(s % 6, 1) for s in range(150)] + [(-1, 2)], 16),  # a 151-row decode batch: short segments
    ([(2, 90), (-1, 10), (4, 60)], 64),  # prefill-sized segments past 128 tokens
])
def test_triton_interp_default_configs_past_128_tokens(requests: list[tuple[int, int]], block_m: int) -> None:
    """Past 128 tokens the launchers pick 16-row token blocks for short segments (a decode
    batch, one token a segment) and 64-row blocks for long ones; both cover every row."""
    assert lora_triton.default_shrink_config(sum(t for _, t in requests), 64, len(requests))["block_m"] == block_m
    assert lora_triton.default_expand_config(sum(t for _, t in requests), len(requests))["block_m"] == block_m
    case = random_lora_case(requests, MIXED_RANKS, 64, WIDTHS, 64, seed=len(requests))
    out = torch.full((3, case.num_tokens, 64), torch.nan)
    lora_triton.sgmv_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks, out)
    assert_shrink_matches(case, out, atol=1e-5)
    v = poisoned_v(case)
    y = torch.randn((case.num_tokens, sum(WIDTHS)))
    y_before = y.clone()
    lora_triton.sgmv_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts, case.segment_slots,
                            case.slot_ranks, case.slot_scales)
    assert_expand_matches(case, y_before, y, v, atol=1e-5)


@needs_interpreter
def test_pool_tables_stay_cached_for_every_pool_set_of_a_deep_model() -> None:
    """A step reads one pool set per LoRA half of each fused projection: 8 a layer, 320 for
    a 40-layer model. Every set's pointer table must survive a whole step, so the next step
    (and a CUDA graph capture, which refuses the host-to-device copy of a rebuild) finds it.
    The cache once held 256 and was cleared past that: a 32-layer model rebuilt its tables
    every step and could not be captured."""
    pool_sets = [[torch.empty((2, 4, 8)) for _ in range(3)] for _ in range(8 * 40)]
    first = [lora_triton._pool_tables(pools, torch.device("cpu")) for pools in pool_sets]
    second = [lora_triton._pool_tables(pools, torch.device("cpu")) for pools in pool_sets]
    assert all(a is b for a, b in zip(first, second))
    pointers, strides = second[-1]
    assert pointers.tolist() == [p.data_ptr() for p in pool_sets[-1]] and strides.tolist() == [[32, 8, 1]] * 3

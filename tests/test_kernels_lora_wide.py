"""The CPU LoRA ops on 16-bit and integer inputs (what an outside kernel probe found):

* float16 pools: x @ A was computed in float16, whose range ends at 65504, so activations of
  ~100 over K = 1024 gave v = inf and y = inf where the answer is ~200 (the CUDA kernels
  accumulate in float32 and got it right); on the masked routes another slot's overflowing
  product turned a token's row NaN (0 x inf);
* integer x, pools and y ran, with the scale truncated (0.3 -> 0), and `lora_apply` took
  integer slot_scales, which `lora_expand` refuses.

Checked against a float64 computation written here, on every CPU route: shrink + expand,
per adapter, masked on the step's slots (`stacked_a`), masked on compact pools.
"""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels import lora_cpu
from inlaid.kernels.dispatch import (
    build_compact_pools,
    lora_apply,
    lora_expand,
    lora_host_segments,
    lora_shrink,
)
from inlaid.kernels.lora_meta import LoraArgumentError

ROUTES = ["shrink_expand", "per_adapter", "masked", "compact"]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _torch_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_cpu, "USE_NATIVE", False)
    monkeypatch.setattr(lora_cpu, "COMPACT_MIN_ACTIVE_SHARE", 0.0)


def _run(route: str, x: torch.Tensor, stacked: torch.Tensor, b_pool: torch.Tensor, token_slots: list[int],
         ranks: torch.Tensor, scales: torch.Tensor, y: torch.Tensor) -> None:
    """y += LoRA(x) through `route`; one slice; token t uses slot token_slots[t] (one token a segment)."""
    starts = torch.arange(len(token_slots) + 1, dtype=torch.int32)
    slots = torch.tensor(token_slots, dtype=torch.int32)
    if route == "shrink_expand":
        v = lora_shrink(x, [stacked], starts, slots, ranks)
        lora_expand(y, v, [b_pool], [0], starts, slots, ranks, scales)
        return
    segments = lora_host_segments(starts, slots, len(token_slots), stacked.shape[0])
    if route == "per_adapter":
        lora_apply(y, x, [stacked], [b_pool], [0], starts, slots, ranks, scales)
    elif route == "masked":
        assert segments.masked_path
        lora_apply(y, x, [stacked], [b_pool], [0], starts, slots, ranks, scales, segments=segments, stacked_a=stacked)
    else:
        compact = build_compact_pools(stacked, [b_pool], ranks, scales)
        lora_apply(y, x, [stacked], [b_pool], [0], starts, slots, ranks, scales, segments=segments,
                   stacked_a=stacked, compact=compact)


def _float64(x: torch.Tensor, stacked: torch.Tensor, b_pool: torch.Tensor, token_slots: list[int],
             ranks: torch.Tensor, scales: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    want = y.double().clone()
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        rank = int(ranks[0, slot])
        v = x[t].double() @ stacked[slot, :rank].double().T
        want[t] += float(scales[0, slot]) * (v @ b_pool[slot, :, :rank].double().T)
    return want


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_product_past_float16s_range_is_computed_in_float32(route: str, dtype: torch.dtype) -> None:
    """x @ A ~ 1.5e5 (> 65504) for every token, y ~ 200: y must be finite and right."""
    gen = torch.Generator().manual_seed(3)
    num_slots, rank, k, n = 3, 4, 1024, 16
    x = (100 + torch.rand((5, k), generator=gen)).to(dtype)
    stacked = (1 + torch.rand((num_slots, rank, k), generator=gen)).to(dtype)
    b_pool = (2e-4 * (1 + torch.rand((num_slots, n, rank), generator=gen))).to(dtype)
    ranks = torch.full((1, num_slots), rank, dtype=torch.int32)
    scales = torch.tensor([[1.0, 2.0, 0.5]])
    token_slots = [0, 1, -1, 2, 0]
    y = torch.randn((5, n), generator=gen).to(dtype)
    want = _float64(x, stacked, b_pool, token_slots, ranks, scales, y)
    assert want.abs().max() < 1e3 and (x[0].double() @ stacked[0].double().T).min() > 65504
    _run(route, x, stacked, b_pool, token_slots, ranks, scales, y)
    assert torch.isfinite(y).all(), y
    torch.testing.assert_close(y.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 10)
    assert torch.equal(y[2].double(), want[2])  # no adapter: untouched


@pytest.mark.parametrize("route", ["masked", "compact", "per_adapter"])
def test_another_slots_overflow_never_reaches_a_tokens_row(route: str) -> None:
    """Token 0 (slot 0) needs only x0 @ A0 (~102); x0 @ A1 would be ~1e5 in float16. Its row
    came out NaN on the masked routes (0 x inf)."""
    k, n, rank = 1024, 16, 4
    x = torch.full((2, k), 100.0)
    x[1] = 0.01
    stacked = torch.empty((2, rank, k))
    stacked[0], stacked[1] = 1e-3, 1.0
    b_pool = torch.full((2, n, rank), 1e-3)
    ranks = torch.full((1, 2), rank, dtype=torch.int32)
    scales = torch.ones((1, 2))
    x, stacked, b_pool = x.half(), stacked.half(), b_pool.half()
    y = torch.zeros((2, n), dtype=torch.float16)
    want = _float64(x, stacked, b_pool, [0, 1], ranks, scales, y)
    _run(route, x, stacked, b_pool, [0, 1], ranks, scales, y)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("route", ROUTES)
def test_float32_results_are_unchanged_by_the_widening(route: str) -> None:
    """float32 inputs: equal to float64 to float32 precision on every route."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((6, 40), generator=gen)
    stacked = torch.randn((3, 8, 40), generator=gen) / 6
    b_pool = torch.randn((3, 24, 8), generator=gen) / 3
    ranks = torch.tensor([[8, 3, 5]], dtype=torch.int32)
    scales = torch.tensor([[0.5, 2.0, 1.0]])
    token_slots = [2, 0, -1, 1, 2, 0]
    y = torch.randn((6, 24), generator=gen)
    want = _float64(x, stacked, b_pool, token_slots, ranks, scales, y)
    _run(route, x, stacked, b_pool, token_slots, ranks, scales, y)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_integer_inputs_and_scales_are_refused() -> None:
    starts = torch.tensor([0, 2], dtype=torch.int32)
    slots = torch.tensor([0], dtype=torch.int32)
    ranks = torch.tensor([[2]], dtype=torch.int32)
    scales = torch.tensor([[0.3]])
    x, a, b = torch.ones((2, 4), dtype=torch.int32), torch.ones((1, 2, 4), dtype=torch.int32), torch.ones(
        (1, 3, 2), dtype=torch.int32)
    y = torch.zeros((2, 3), dtype=torch.int32)
    with pytest.raises(LoraArgumentError, match="x must be floating-point"):
        lora_shrink(x, [a], starts, slots, ranks)
    with pytest.raises(LoraArgumentError, match="y must be floating-point"):
        lora_expand(y, torch.zeros((1, 2, 2)), [b], [0], starts, slots, ranks, scales)
    with pytest.raises(LoraArgumentError, match="must be floating-point"):
        lora_apply(y, x, [a], [b], [0], starts, slots, ranks, scales)
    assert not y.any()
    xf, af, bf, yf = x.float(), a.float(), b.float(), y.float()
    for integer_scales in (torch.tensor([[1]]), torch.tensor([[True]])):
        with pytest.raises(LoraArgumentError, match="slot_scales must be floating-point"):
            lora_apply(yf, xf, [af], [bf], [0], starts, slots, ranks, integer_scales)
    assert not yf.any()

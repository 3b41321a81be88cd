"""The compiled Triton kernels on a CUDA device (skipped without one): realistic shapes,
fp16/bf16, the dispatch picking Triton, and LoRA replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from inlaid.kernels.dispatch import lora_apply, lora_shrink, prepare_quant_linear, quant_matmul
from inlaid.kernels.lora_meta import build_lora_segments
from inlaid.kernels.lora_reference import lora_expand_reference, lora_shrink_reference
from inlaid.kernels.testing import random_gptq_layer, random_lora_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

RANKS = [[8, 16, 32, 64] * 8] * 3  # 32 slots, mixed ranks, three fused slices
WIDTHS = [2048, 512, 512]


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double().cpu() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("requests", [
    [(s, 1) for s in range(32)] + [(-1, 4)],  # decode: many length-1 segments
    [(0, 300), (5, 17), (-1, 9), (31, 180)],  # prefill: long segments
])
def test_sgmv_on_cuda(dtype: torch.dtype, requests: list[tuple[int, int]]) -> None:
    case = random_lora_case(requests, RANKS, 2048, WIDTHS, 64, seed=1)
    gpu = case.to("cuda")
    gpu.x, gpu.a_pools, gpu.b_pools = gpu.x.to(dtype), [a.to(dtype) for a in gpu.a_pools], [b.to(dtype) for b in gpu.b_pools]
    # Outputs poisoned: torch.empty on CUDA often hands back the previous case's memory, which
    # holds nearly the right values.
    poisoned = torch.full((len(WIDTHS), case.num_tokens, gpu.a_pools[0].shape[1]), torch.nan, device="cuda")
    v = lora_shrink(gpu.x, gpu.a_pools, gpu.segment_starts, gpu.segment_slots, gpu.slot_ranks, out=poisoned)
    ref_v = lora_shrink_reference(case.x, case.a_pools, case.segment_starts, case.segment_slots, case.slot_ranks)
    mask = case.defined_mask()
    assert _error(v.cpu()[mask], ref_v[mask]) < 2e-2
    y = torch.randn((case.num_tokens, sum(WIDTHS)), device="cuda").to(dtype)
    y_before = y.cpu().clone()
    lora_apply(y, gpu.x, gpu.a_pools, gpu.b_pools, gpu.slice_offsets, gpu.segment_starts,
               gpu.segment_slots, gpu.slot_ranks, gpu.slot_scales)
    v_ref = torch.where(mask, ref_v, torch.nan).float()
    ref_y = lora_expand_reference(y_before, v_ref, case.b_pools, case.slice_offsets, case.segment_starts,
                                  case.segment_slots, case.slot_ranks, case.slot_scales)
    assert _error(y - y_before.cuda(), ref_y - y_before.double()) < 3e-2


def test_lora_replays_from_a_cuda_graph_with_new_segments() -> None:
    num_tokens = 32
    case = random_lora_case([(s, 1) for s in range(num_tokens)], RANKS, 1024, WIDTHS, 64,
                            dtype=torch.float16, seed=2).to("cuda")
    starts_buf = torch.zeros(num_tokens + 1, dtype=torch.int32, device="cuda")
    slots_buf = torch.zeros(num_tokens, dtype=torch.int32, device="cuda")
    v_buf = torch.full((3, num_tokens, 64), torch.nan, dtype=torch.float32, device="cuda")
    y = torch.zeros((num_tokens, sum(WIDTHS)), dtype=torch.float16, device="cuda")

    def step() -> None:
        y.zero_()
        lora_apply(y, case.x, case.a_pools, case.b_pools, case.slice_offsets, starts_buf, slots_buf,
                   case.slot_ranks, case.slot_scales, v_buffer=v_buf)

    starts, slots = build_lora_segments([s for s in range(num_tokens)], [1] * num_tokens, capacity=num_tokens)
    starts_buf.copy_(starts)
    slots_buf.copy_(slots)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles kernels and builds the cached pointer tables
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # a different segmentation in the same buffers: 3 long segments, one without adapter
    new_starts, new_slots = build_lora_segments([4, -1, 9], [10, 12, 10], capacity=num_tokens)
    starts_buf.copy_(new_starts)
    slots_buf.copy_(new_slots)
    graph.replay()
    torch.cuda.synchronize()
    cpu = case.to("cpu")
    ref = lora_expand_reference(
        torch.zeros((num_tokens, sum(WIDTHS))),
        lora_shrink_reference(cpu.x, cpu.a_pools, new_starts, new_slots, cpu.slot_ranks).float(),
        cpu.b_pools, cpu.slice_offsets, new_starts, new_slots, cpu.slot_ranks, cpu.slot_scales,
    )
    assert torch.equal(y[10:22].cpu(), torch.zeros_like(y[10:22].cpu()))
    assert _error(y, ref) < 3e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_on_cuda(bits: int, act_order: bool, dtype: torch.dtype) -> None:
    # bf16 here and in the GPU suite only: the Triton interpreter's bf16 `tl.dot` is broken
    # (docs/kernels.md, "Known limits"), so the CPU tests cannot check it.
    layer = random_gptq_layer(4096, 1024, bits, 128, act_order=act_order, bias=True, seed=bits)
    prepared = prepare_quant_linear(layer.weights, "cuda", dtype)
    assert prepared.kind == "triton"
    weight = layer.dense_float64()
    for m in (1, 4, 16, 64, 256):  # decode, tiled GEMM, and the dequant + cuBLAS fallback
        x = torch.randn(m, 4096).to(dtype)
        out = quant_matmul(x.to("cuda"), prepared, out=torch.full((m, 1024), torch.nan, dtype=dtype, device="cuda"))
        ref = x.double() @ weight + layer.weights.bias.double()
        assert out.dtype == dtype
        # bf16 keeps 8 bits of mantissa to fp16's 11: its rounding of x, the weight and y
        assert _error(out, ref) < (5e-3 if dtype == torch.float16 else 2e-2), m

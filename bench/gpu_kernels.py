"""GPU suite, kernels: low-bit GEMM and SGMV, checked at full size, then timed.

Checks (fresh random inputs, float64 references built from the ground truth, never from
the code under test; the shrink output is poisoned with NaN before each run):
  * W4/W3/W2 GEMM through the dispatch (`quant_matmul`, the engine's path: Triton for
    small M, dequantize + cuBLAS from `dense_min_m`) on Llama-2-7B's linear shapes;
  * SGMV shrink and expand on a decode batch (one token per adapter) and on prefill
    segments, 100 slots of mixed ranks, q/k/v-sized slices.
Timings (CUDA graphs, `triton.testing.do_bench_cudagraph`):
  * the GEMM at M = 1..256 against cuBLAS fp16 (`x @ W`) and against its floor -- the
    bytes it must move (codes, scales, zero points, activations) at the device's measured
    copy bandwidth;
  * shrink and expand separately, rank 16, 1..100 distinct adapters in 1..256 tokens,
    against their floor (activations, the touched adapters' A or B, the intermediate, the
    output read and written).
In a dry run (CPU, TRITON_INTERPRET=1) the shapes are tiny and "cuBLAS" is torch's CPU
matmul: it checks the script, not the speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Device:
    """Where the suite runs and how it times."""

    torch_device: torch.device
    act_dtype: torch.dtype
    dry_run: bool
    copy_gbps: float = 0.0  # measured device copy bandwidth, bytes read + written
    out_dir: Path | None = None  # the suite's report folder: stages may leave raw data there
    deadline: float | None = None  # time.monotonic() by which the suite must end (its budget)
    save_partial: Callable[[dict], None] | None = None  # a stage's data so far, written into the report

    def ms(self, fn: Callable[[], object], graph: bool = True) -> float:
        if self.dry_run:
            fn()
            samples = []
            for _ in range(2):
                started = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - started) * 1e3)
            return statistics.median(samples)
        import triton.testing

        fn()  # compiles kernels and fills pointer caches before any capture
        torch.cuda.synchronize()
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=40))
        return float(triton.testing.do_bench(fn, warmup=5, rep=40))

    def floor_ms(self, num_bytes: float) -> float:
        return num_bytes / (self.copy_gbps * 1e9) * 1e3

    def sync(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()


def copy_bandwidth(device: Device) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written."""
    size = (1 << 22) if device.dry_run else (1 << 30)
    source = torch.empty(size, dtype=torch.uint8, device=device.torch_device)
    target = torch.empty_like(source)
    return 2 * size / (device.ms(lambda: target.copy_(source), graph=False) * 1e-3) / 1e9


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want.cpu()).norm() / want.norm())


# ------------------------------------------------------------------------------------ GEMM

LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
GEMM_M = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CHECK_M = [1, 16, 64, 256]  # the decode config, the tiled GEMM, dequant + cuBLAS (>= dense_min_m)


def gemm(device: Device) -> dict:
    """Checks and timings of W4/W3/W2 GEMM; one random layer per (bits, shape), used for both."""
    from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
    from inlaid.kernels.testing import random_gptq_layer

    shapes = [(128, 64)] if device.dry_run else LLAMA7B_SHAPES
    m_values = [1, 16] if device.dry_run else GEMM_M
    check_m = [1, 16] if device.dry_run else CHECK_M
    group = 32 if device.dry_run else 128
    tolerance = 1e-4 if device.act_dtype == torch.float32 else 1e-2
    checks, timings, compile_seconds = [], [], 0.0
    data = {"checks": checks, "timings": timings, "group_size": group, "first_call_seconds": compile_seconds}
    cublas: dict[tuple[int, int, int], float] = {}
    for bits in (4, 3, 2):
        # The bf16 checks never ran on a GPU, so the stage's time is a guess: a bit width is not
        # started past the suite's budget, and each finished one is saved (an interrupt keeps it).
        if device.deadline is not None and time.monotonic() > device.deadline:
            data["cut"] = f"the suite's budget ran out before W{bits}"
            break
        for k, n in shapes:
            layer = random_gptq_layer(k, n, bits, group, seed=k + n + bits)
            prepared = prepare_quant_linear(layer.weights, device.torch_device, device.act_dtype,
                                            mode="triton" if device.dry_run else "auto")
            reference = layer.dense_float64().to(device.torch_device)
            for m in check_m:
                x = torch.randn((m, k), device=device.torch_device).to(device.act_dtype)
                started = time.perf_counter()
                got = quant_matmul(x, prepared)
                device.sync()
                compile_seconds += time.perf_counter() - started  # the first call of a config compiles it
                error = _relative_error(got, x.double() @ reference)
                checks.append({"bits": bits, "K": k, "N": n, "M": m, "relative_error": error,
                               "ok": error < tolerance})
            if device.dry_run or (k, n) != shapes[0]:
                del reference
            else:  # bf16 activations too (the engine's other half dtype), on the first shape
                checks += _bf16_gemm_checks(device, layer, reference, bits, k, n)
                del reference
            dense = (torch.randn((k, n), device=device.torch_device) * 0.02).to(device.act_dtype)
            weight_bytes = k * n * bits / 8 + 2 * (k // group) * n * 2  # codes + scales and zero points
            for m in m_values:
                x = torch.randn((m, k), device=device.torch_device).to(device.act_dtype)
                if (k, n, m) not in cublas:
                    cublas[(k, n, m)] = device.ms(lambda: x @ dense)
                quant_ms = device.ms(lambda: quant_matmul(x, prepared))
                floor = device.floor_ms(weight_bytes + 2 * m * (k + n))
                timings.append({"bits": bits, "K": k, "N": n, "M": m, "cublas_fp16_ms": cublas[(k, n, m)],
                                "quant_ms": quant_ms, "speedup_vs_cublas": cublas[(k, n, m)] / quant_ms,
                                "floor_ms": floor, "fraction_of_floor": floor / quant_ms})
                print(f"  W{bits} K={k:5d} N={n:5d} M={m:3d}: {quant_ms * 1e3:8.1f} us, cuBLAS fp16 "
                      f"{cublas[(k, n, m)] * 1e3:8.1f} us ({cublas[(k, n, m)] / quant_ms:.2f}x), "
                      f"floor {floor * 1e3:.1f} us ({100 * floor / quant_ms:.0f}%)", flush=True)
        data["first_call_seconds"] = compile_seconds
        if device.save_partial is not None:
            device.save_partial(data)
    return data


# bf16 is checked on the GPU only: Triton 3.9's interpreter returns garbage from `tl.dot` on
# bf16 operands (a 16x16 product off by ~1e10; fp16 is exact), so a dry run cannot check it
# (docs/kernels.md, "Known limits"). bf16 errors are bf16's rounding of x and of the weight.
BF16_TOLERANCE = 2e-2


def _bf16_gemm_checks(device: Device, layer, reference: torch.Tensor, bits: int, k: int, n: int) -> list[dict]:  # noqa: ANN001
    from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul

    prepared = prepare_quant_linear(layer.weights, device.torch_device, torch.bfloat16, mode="triton")
    rows = []
    for m in CHECK_M:  # the GEMV kernel, the tiled GEMM, dequant + cuBLAS
        x = torch.randn((m, k), device=device.torch_device).to(torch.bfloat16)
        got = quant_matmul(x, prepared)
        device.sync()
        error = _relative_error(got, x.double() @ reference)
        rows.append({"bits": bits, "K": k, "N": n, "M": m, "dtype": "bfloat16", "relative_error": error,
                     "ok": got.dtype == torch.bfloat16 and error < BF16_TOLERANCE})
    return rows


# ------------------------------------------------------------------------------------ SGMV

def _to_device(case, device: Device, dtype: torch.dtype | None = None):  # noqa: ANN001, ANN202  (a LoraCase)
    dtype = dtype or device.act_dtype
    moved = case.to(device.torch_device)
    moved.x = moved.x.to(dtype)
    moved.a_pools = [a.to(dtype) for a in moved.a_pools]
    moved.b_pools = [b.to(dtype) for b in moved.b_pools]
    return moved


def _sgmv_ops(device: Device) -> tuple[Callable, Callable]:
    """The dispatch's shrink and expand (the engine's path); in a dry run the Triton kernels
    themselves, interpreted (the dispatch would take the CPU path for CPU tensors)."""
    if device.dry_run:
        from inlaid.kernels.lora_triton import sgmv_expand, sgmv_shrink

        return sgmv_shrink, sgmv_expand
    from inlaid.kernels.dispatch import lora_expand, lora_shrink

    return lora_shrink, lora_expand


def sgmv_checks(device: Device) -> list[dict]:
    """Shrink and expand against the float64 references, 100 slots of mixed ranks 8..64."""
    from inlaid.kernels.lora_reference import lora_expand_reference, lora_shrink_reference
    from inlaid.kernels.testing import random_lora_case

    if device.dry_run:  # the interpreter runs every program in numpy: few tokens, ranks up to 32
        hidden, widths, slots, rank_cycle = 64, [64, 32], 8, (8, 16, 32)
        cases = {"decode": [(s, 1) for s in range(8)] + [(-1, 2)], "prefill": [(0, 12), (5, 5), (-1, 3), (7, 6)]}
    else:
        hidden, widths, slots, rank_cycle = 4096, [4096, 4096, 4096], 100, (8, 16, 32, 64)
        cases = {"decode": [(s % slots, 1) for s in range(256)] + [(-1, 3)],
                 "prefill": [(0, 300), (5, 17), (-1, 9), (99, 180), (42, 64)]}
    lora_shrink, lora_expand = _sgmv_ops(device)
    ranks = [[rank_cycle[s % len(rank_cycle)] for s in range(slots)]] * len(widths)
    r_max = max(rank_cycle)
    # bf16 pools on the GPU only: the interpreter's bf16 `tl.dot` is broken (BF16_TOLERANCE).
    dtypes = [device.act_dtype] + ([] if device.dry_run else [torch.bfloat16])
    rows = []
    for dtype in dtypes:
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for name, requests in cases.items():
            case = random_lora_case(requests, ranks, hidden, widths, r_max, seed=len(requests))
            on_device = _to_device(case, device, dtype)
            mask = case.defined_mask()
            v = torch.full((len(widths), case.num_tokens, r_max), float("nan"), device=device.torch_device)
            lora_shrink(on_device.x, on_device.a_pools, on_device.segment_starts, on_device.segment_slots,
                        on_device.slot_ranks, v)
            reference_v = lora_shrink_reference(case.x.to(dtype).float(), [a.to(dtype).float() for a in case.a_pools],
                                                case.segment_starts, case.segment_slots, case.slot_ranks)
            shrink_error = _relative_error(v.cpu()[mask], reference_v[mask])
            y = torch.randn((case.num_tokens, sum(widths)), device=device.torch_device).to(dtype)
            y_before = y.cpu().double()
            v_in = torch.where(mask, reference_v, torch.nan).float()
            lora_expand(y, v_in.to(device.torch_device), on_device.b_pools, case.slice_offsets,
                        on_device.segment_starts, on_device.segment_slots, on_device.slot_ranks,
                        on_device.slot_scales)
            reference_y = lora_expand_reference(y_before, v_in, [b.to(dtype).float() for b in case.b_pools],
                                                case.slice_offsets, case.segment_starts, case.segment_slots,
                                                case.slot_ranks, case.slot_scales)
            expand_error = _relative_error(y.cpu().double() - y_before, reference_y - y_before)
            for op, error in (("shrink", shrink_error), ("expand", expand_error)):
                row = {"op": op, "case": name, "tokens": case.num_tokens, "slots": slots, "K": hidden,
                       "widths": widths, "relative_error": error, "ok": error < tolerance}
                if dtype != device.act_dtype:
                    row["dtype"] = "bfloat16"
                rows.append(row)
    return rows


def sgmv_timings(device: Device) -> list[dict]:
    """Shrink and expand separately, rank 16 on q/k/v-sized slices, vs the bandwidth floor."""
    from inlaid.kernels.testing import random_lora_case

    lora_shrink, lora_expand = _sgmv_ops(device)
    hidden, widths, slots = (64, [64, 32], 4) if device.dry_run else (4096, [4096, 4096, 4096], 100)
    token_counts = [1, 16] if device.dry_run else [1, 16, 64, 256]
    rank, size = 16, torch.finfo(device.act_dtype).bits // 8
    rows = []
    for tokens in token_counts:
        for distinct in sorted({1, min(tokens, 16, slots), min(tokens, slots)}):
            requests = [(s, tokens // distinct + (s < tokens % distinct)) for s in range(distinct)]
            case = _to_device(random_lora_case(requests, [[rank] * slots] * len(widths), hidden, widths, rank,
                                               seed=tokens + distinct), device)
            v = torch.empty((len(widths), tokens, rank), dtype=torch.float32, device=device.torch_device)
            y = torch.zeros((tokens, sum(widths)), dtype=device.act_dtype, device=device.torch_device)
            shrink_ms = device.ms(lambda: lora_shrink(case.x, case.a_pools, case.segment_starts, case.segment_slots,
                                                      case.slot_ranks, v))
            v.nan_to_num_(0.0)
            expand_ms = device.ms(lambda: lora_expand(y, v, case.b_pools, case.slice_offsets, case.segment_starts,
                                                      case.segment_slots, case.slot_ranks, case.slot_scales))
            v_bytes = len(widths) * tokens * rank * 4
            shrink_bytes = tokens * hidden * size + distinct * len(widths) * rank * hidden * size + v_bytes
            expand_bytes = v_bytes + distinct * sum(widths) * rank * size + 2 * tokens * sum(widths) * size
            for op, ms, moved in (("shrink", shrink_ms, shrink_bytes), ("expand", expand_ms, expand_bytes)):
                floor = device.floor_ms(moved)
                rows.append({"op": op, "tokens": tokens, "distinct_adapters": distinct, "rank": rank, "K": hidden,
                             "widths": widths, "ms": ms, "GBps": moved / (ms * 1e-3) / 1e9, "floor_ms": floor,
                             "fraction_of_floor": floor / ms})
                print(f"  {op:6s} {tokens:3d} tokens, {distinct:3d} adapters: {ms * 1e3:7.1f} us, "
                      f"{moved / (ms * 1e-3) / 1e9:6.0f} GB/s ({100 * floor / ms:.0f}% of the floor)", flush=True)
    return rows

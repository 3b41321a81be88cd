"""GPU suite, GEMM configurations: which tiles and routes the low-bit GEMM should take.

The first H200 run (bench/results/gpu_h200.md) found the 4-bit decode GEMM at 10-14% of its
bandwidth floor and slower than cuBLAS fp16 at M = 1..16, and the tiled kernel at M = 32..64
slower than dequantize + cuBLAS at M = 128. This stage measures the alternatives in one call,
on Llama-2-7B's linear shapes, 4-bit, group 128:
  * decode (M = 1, 4, 16): BLOCK_N x SPLIT_K x num_warps around `default_gemm_config` (the
    GEMV kernel up to GEMV_MAX_M rows, where the tiled kernel is timed beside it), each
    variant checked against the default's output before it is timed;
  * the route from M = 16 to 128: the tiled kernel against dequantize + cuBLAS
    (`dense_min_m`, where the dispatch switches).
The defaults in kernels/quant_triton.py are then set from these numbers.
"""

from __future__ import annotations

import torch

from gpu_kernels import LLAMA7B_SHAPES, Device, _relative_error

DECODE_M = [1, 4, 16]
ROUTE_M = [16, 32, 64, 128]


def _variants(default: dict[str, int], tiled: dict[str, int], k_tiles: int) -> list[dict[str, int]]:
    """Around the default: BLOCK_N x SPLIT_K (x 8 warps at the widest tile); at GEMV sizes
    the tiled kernel's decode configuration too (gemv=0)."""
    splits = sorted({max(1, min(k_tiles, default["split_k"] * factor)) for factor in (1, 2, 4)}
                    | {max(1, default["split_k"] // 2)})
    variants = [{**default, "block_n": block_n, "split_k": split} for block_n in (32, 64, 128) for split in splits]
    variants += [{**default, "block_n": 128, "split_k": split, "num_warps": 8} for split in splits]
    if default.get("gemv"):
        variants = [v for v in variants if v["block_n"] != 32]
        variants += [{**default, "block_n": 256, "split_k": split} for split in splits]
        variants += [{**default, "block_n": block_n, "block_k": block_k} for block_n in (128, 256) for block_k in (32, 64)
                     if block_k < default["block_k"]]
        variants.append({**tiled, "gemv": 0})
    return [default] + [v for v in variants if v != default]


def gemm_configs(device: Device) -> dict:
    from inlaid.kernels.quant_triton import default_gemm_config, prepare_triton_layout, triton_quant_matmul

    shapes = [(128, 64)] if device.dry_run else LLAMA7B_SHAPES
    bits, group = 4, (32 if device.dry_run else 128)
    decode_rows, route_rows, checks = [], [], []
    for k, n in shapes:
        generator = torch.Generator(device="cpu").manual_seed(k * 7 + n)
        codes = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=generator)
        zeros = torch.randint(0, 16, (k // group, n), dtype=torch.int32, generator=generator)
        scales = torch.rand((k // group, n), generator=generator) * 0.01 + 0.005
        layout = prepare_triton_layout(codes, zeros, scales, bits, group, device.torch_device, device.act_dtype)
        for m in DECODE_M if not device.dry_run else [1]:
            x = torch.randn((m, k), device=device.torch_device).to(device.act_dtype)
            default = default_gemm_config(m, n, k, group, x.device)
            tiled = default_gemm_config(16, n, k, group, x.device)
            expected = triton_quant_matmul(x, layout, bits, None, dense_min_m=1 << 30).double()
            k_tiles = -(-k // default["block_k"])
            for config in _variants(default, tiled, k_tiles) if not device.dry_run else [default]:
                got = triton_quant_matmul(x, layout, bits, None, dense_min_m=1 << 30, **config)
                error = _relative_error(got, expected)
                checks.append({"check": f"config {config} == default, K={k} N={n} M={m}", "relative_error": error,
                               "ok": error < (1e-5 if device.act_dtype == torch.float32 else 2e-2)})
                ms = device.ms(lambda: triton_quant_matmul(x, layout, bits, None, dense_min_m=1 << 30, **config))
                decode_rows.append({"K": k, "N": n, "M": m, "config": config, "default": config == default, "ms": ms})
            best = min((r for r in decode_rows if (r["K"], r["N"], r["M"]) == (k, n, m)), key=lambda r: r["ms"])
            base = next(r for r in decode_rows if (r["K"], r["N"], r["M"]) == (k, n, m) and r["default"])
            print(f"  K={k:5d} N={n:5d} M={m:3d}: default {base['ms'] * 1e3:6.1f} us, best {best['ms'] * 1e3:6.1f} us "
                  f"{best['config']}", flush=True)
        for m in ROUTE_M if not device.dry_run else [16]:
            x = torch.randn((m, k), device=device.torch_device).to(device.act_dtype)
            tiled = device.ms(lambda: triton_quant_matmul(x, layout, bits, None, dense_min_m=1 << 30))
            dense = device.ms(lambda: triton_quant_matmul(x, layout, bits, None, dense_min_m=1))
            route_rows.append({"K": k, "N": n, "M": m, "tiled_ms": tiled, "dequant_cublas_ms": dense})
            print(f"  K={k:5d} N={n:5d} M={m:3d}: tiled {tiled * 1e3:6.1f} us, dequantize + cuBLAS "
                  f"{dense * 1e3:6.1f} us", flush=True)
    return {"bits": bits, "group_size": group, "decode": decode_rows, "routes": route_rows, "checks": checks}

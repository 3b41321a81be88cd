"""GPU suite, GEMM configurations: which tiles and routes the low-bit GEMM should take.

The first H200 run (bench/results/gpu_h200.md) found the 4-bit decode GEMM at 10-14% of its
bandwidth floor and slower than cuBLAS fp16 at M = 1..16, and the tiled kernel at M = 32..64
slower than dequantize + cuBLAS at M = 128. This stage measures the alternatives in one call,
on Llama-2-7B's linear shapes, 4-bit, group 128:
  * decode (M = 1, 4, 16): BLOCK_N x SPLIT_K x num_warps around `default_gemm_config` (the
    GEMV kernel up to GEMV_MAX_M rows, where the tiled kernel is timed beside it), each
    variant checked against the default's output before it is timed;
  * the route from M = 16 to 128: the tiled kernel against dequantize + cuBLAS
    (`dense_min_m`, where the dispatch switches);
  * the tiled kernel's compile-time variants at its default tile config, M = 4 and 16 (its
    decode config) and the route rows: unpack_once x factored (each packed word loaded once;
    scale and zero after the dot), then num_stages 2 and 4 for the fastest of the four (3 is
    Triton's default), each checked against the default's output, beside the default and
    dequantize + cuBLAS (`tiled_variants` rows, `markdown_section`).
The defaults in kernels/quant_triton.py are then set from these numbers.
"""

from __future__ import annotations

import time

import torch

from gpu_kernels import LLAMA7B_SHAPES, Device, _relative_error

DECODE_M = [1, 4, 16]
ROUTE_M = [16, 32, 64, 128]
VARIANT_M = [4, 16, 32, 64, 128]  # the tiled kernel's decode config (4, 16) and the route rows
COMBOS = [(0, 0), (1, 0), (0, 1), (1, 1)]  # (unpack_once, factored); (0, 0) is the default
STAGES = [2, 4]  # num_stages tried on the fastest combination (3: Triton's CUDA default)


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


def _tiled_variants(device: Device, layout, bits: int, x: torch.Tensor, default_ms: float | None,  # noqa: ANN001
                    dense_ms: float | None, checks: list[dict]) -> list[dict]:
    """Rows {unpack_once, factored, num_stages (None: Triton's), ms} of the tiled kernel at its
    default tile config (gemv=0), each checked against the default's output; the default's and
    dequantize + cuBLAS's times are reused when the stage already has them, else timed."""
    from inlaid.kernels.quant_triton import triton_quant_matmul

    def run(**config: int) -> torch.Tensor:
        return triton_quant_matmul(x, layout, bits, None, dense_min_m=1 << 30, gemv=0, **config)

    (m, k), n = x.shape, layout.scales.shape[1]
    expected = run().double()
    if default_ms is None:
        default_ms = device.ms(run)
    if dense_ms is None:
        dense_ms = device.ms(lambda: triton_quant_matmul(x, layout, bits, None, dense_min_m=1))
    tolerance = 1e-5 if device.act_dtype == torch.float32 else 2e-2
    rows = []

    def measure(config: dict[str, int]) -> None:
        if config == {"unpack_once": 0, "factored": 0}:  # the default itself
            ms = default_ms
        else:
            error = _relative_error(run(**config), expected)
            checks.append({"check": f"tiled variant {config} == default, K={k} N={n} M={m}", "relative_error": error,
                           "ok": error < tolerance})
            ms = device.ms(lambda: run(**config))
        rows.append({"K": k, "N": n, "M": m, "unpack_once": config["unpack_once"], "factored": config["factored"],
                     "num_stages": config.get("num_stages"), "ms": ms, "default_ms": default_ms,
                     "dequant_cublas_ms": dense_ms})

    for unpack_once, factored in COMBOS:
        measure({"unpack_once": unpack_once, "factored": factored})
    fastest = min(rows, key=lambda r: r["ms"])
    for stages in STAGES:
        measure({"unpack_once": fastest["unpack_once"], "factored": fastest["factored"], "num_stages": stages})
    best = min(rows, key=lambda r: r["ms"])
    times = ", ".join(f"{_variant_name(r)} {r['ms'] * 1e3:.1f}" for r in rows)
    print(f"  K={k:5d} N={n:5d} M={m:3d}: tiled {times} us; dequantize + cuBLAS {dense_ms * 1e3:.1f} us -> "
          f"{_variant_name(best)}: {default_ms / best['ms']:.2f}x default, {dense_ms / best['ms']:.2f}x dequant+cuBLAS",
          flush=True)
    return rows


def _variant_name(row: dict) -> str:
    name = {(0, 0): "default", (1, 0): "unpack_once", (0, 1): "factored", (1, 1): "unpack_once+factored"}[
        (row["unpack_once"], row["factored"])]
    return name if row["num_stages"] is None else f"{name} stages={row['num_stages']}"


def markdown_section(data: dict) -> list[str]:
    """The tiled kernel's variants, one line per (K, N, M): microseconds of each, the fastest."""
    rows = data.get("tiled_variants", [])
    if not rows:
        return []
    names = [_variant_name({"unpack_once": u, "factored": f, "num_stages": None}) for u, f in COMBOS]
    lines = ["", "## 4-bit tiled kernel variants at the default tile config (microseconds, CUDA graphs)", "",
             "num_stages: tried on the fastest of the four (Triton's default is 3).", "",
             "| K | N | M | " + " | ".join(names) + " | num_stages | dequantize + cuBLAS | fastest | vs default | "
             "vs dequant + cuBLAS |", "|---" * (len(names) + 8) + "|"]
    for key in sorted({(r["K"], r["N"], r["M"]) for r in rows}):
        group = [r for r in rows if (r["K"], r["N"], r["M"]) == key]
        combos = {(r["unpack_once"], r["factored"]): r["ms"] for r in group if r["num_stages"] is None}
        stages = ", ".join(f"{r['num_stages']}: {r['ms'] * 1e3:.1f}" for r in group if r["num_stages"] is not None)
        best = min(group, key=lambda r: r["ms"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{combos[c] * 1e3:.1f}" for c in COMBOS)
                     + f" | {stages} | {best['dequant_cublas_ms'] * 1e3:.1f} | {_variant_name(best)} | "
                     f"{best['default_ms'] / best['ms']:.2f}x | {best['dequant_cublas_ms'] / best['ms']:.2f}x |")
    return lines


def gemm_configs(device: Device) -> dict:
    from inlaid.kernels.quant_triton import default_gemm_config, prepare_triton_layout, triton_quant_matmul

    shapes = [(128, 64)] if device.dry_run else LLAMA7B_SHAPES
    bits, group = 4, (32 if device.dry_run else 128)
    decode_rows, route_rows, variant_rows, checks = [], [], [], []
    data = {"bits": bits, "group_size": group, "decode": decode_rows, "routes": route_rows,
            "tiled_variants": variant_rows, "checks": checks}
    for k, n in shapes:
        # Its variants never ran on a GPU, so its time is a guess: a shape is not started past the
        # suite's budget, and each finished one is saved (an interrupt keeps them).
        if device.deadline is not None and time.monotonic() > device.deadline:
            data["cut"] = f"the suite's budget ran out before K={k} N={n}"
            break
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
        for m in VARIANT_M if not device.dry_run else [4, 16]:
            x = torch.randn((m, k), device=device.torch_device).to(device.act_dtype)
            # the default's time where the stage took it already (the tiled kernel's: not a GEMV default)
            default_ms = next((r["ms"] for r in decode_rows if (r["K"], r["N"], r["M"]) == (k, n, m) and r["default"]
                               and not r["config"].get("gemv")),
                              next((r["tiled_ms"] for r in route_rows if (r["K"], r["N"], r["M"]) == (k, n, m)), None))
            dense_ms = next((r["dequant_cublas_ms"] for r in route_rows if (r["K"], r["N"], r["M"]) == (k, n, m)), None)
            variant_rows += _tiled_variants(device, layout, bits, x, default_ms, dense_ms, checks)
        if device.save_partial is not None:
            device.save_partial(data)
    print("\n".join(markdown_section(data)), flush=True)
    return data

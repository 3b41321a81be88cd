"""The GPU suite's report (bench/gpu_suite.py writes it after every stage): the markdown
tables, the PNG, and the second call that would run what the first did not."""

from __future__ import annotations

from pathlib import Path


def rerun_hint(report: dict) -> str:
    """The stages a second call should run: those skipped for time, cut by an interrupt, or
    left `running` or `pending` (the process killed). Its GPU_CALL_S is the lease's device time left (the
    device tool's `status`), less 15 s: the default 590 would outlast it."""
    left = [name for name, entry in report["stages"].items()
            if entry["status"] in ("running", "pending") or entry.get("reason", "").startswith(
                ("time budget", "would not end", "interrupted"))]
    return (f"GPU_CALL_S=<device seconds left - 15> GPU_SUITE_STAGES={','.join(left)} bash bench/gpu.sh"
            if left else "")


def markdown(report: dict) -> str:
    stages = report["stages"]
    env = stages["environment"].get("data", {})
    lines = [f"# GPU suite{' (dry run: CPU, TRITON_INTERPRET=1, tiny shapes; not a measurement)' if report['dry_run'] else ''}",
             "", f"{env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda')}; copy bandwidth {env.get('copy_GBps', 0):.0f} GB/s (read + write); "
             f"total {report.get('total_seconds', 0)} s of a {report['budget_s']:.0f} s budget.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in stages.items():
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {entry.get('reason', '')} |")
    if rerun_hint(report):
        lines += ["", f"Not run for lack of time: `{rerun_hint(report)}` runs them in a second call."]
    checks = [(name, c) for name, entry in stages.items() for c in entry.get("data", {}).get("checks", [])]
    if checks:
        lines += ["", "## Checks", "", "| stage | check | relative error | ok |", "|---|---|---|---|"]
        for name, c in checks:
            what = c.get("check") or ", ".join(f"{k}={c[k]}" for k in ("bits", "op", "case", "K", "N", "M", "tokens", "dtype") if k in c)
            lines.append(f"| {name} | {what} | {c['relative_error']:.2e} | {'yes' if c['ok'] else '**NO**'} |")
    gemm = stages.get("gemm", {}).get("data", {}).get("timings", [])
    if gemm:
        lines += ["", "## Low-bit GEMM vs cuBLAS fp16 (microseconds, CUDA graphs)", "",
                  "| bits | K | N | M | quantized | cuBLAS fp16 | speedup | floor | % of floor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in gemm:
            lines.append(f"| {r['bits']} | {r['K']} | {r['N']} | {r['M']} | {r['quant_ms'] * 1e3:.1f} | "
                         f"{r['cublas_fp16_ms'] * 1e3:.1f} | {r['speedup_vs_cublas']:.2f}x | {r['floor_ms'] * 1e3:.1f} | "
                         f"{100 * r['fraction_of_floor']:.0f}% |")
    sgmv = stages.get("sgmv", {}).get("data", {}).get("timings", [])
    if sgmv:
        lines += ["", "## SGMV shrink / expand, rank 16 (microseconds, CUDA graphs)", "",
                  "| op | tokens | adapters | time | GB/s | floor | % of floor |", "|---|---|---|---|---|---|---|"]
        for r in sgmv:
            lines.append(f"| {r['op']} | {r['tokens']} | {r['distinct_adapters']} | {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | "
                         f"{r['floor_ms'] * 1e3:.1f} | {100 * r['fraction_of_floor']:.0f}% |")
    decode = stages.get("decode", {}).get("data")
    if decode:
        lines += ["", f"## Decode step: {decode['model']}, {decode['bits']}-bit g{decode['group_size']}, "
                      f"{decode['adapters']} adapters r{decode['rank']}, context {decode['context']} ({decode['dtype']})", "",
                  f"Graphs for batch sizes {decode['graph_batch_sizes']} captured in {decode['capture_seconds']:.1f} s.", "",
                  "| batch | eager ms | graph ms | tokens/s | floor ms | % of floor |", "|---|---|---|---|---|---|"]
        for r in decode["steps"]:
            lines.append(f"| {r['batch']} | {r['eager_ms']:.2f} | {r['graph_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{r['floor_ms']:.2f} | {100 * r['fraction_of_floor']:.0f}% |")
    costs = stages.get("step_costs", {}).get("data")
    if costs:
        lines += ["", f"## Step costs: {costs['model']}, eager, {costs['slots']} adapters r{costs['rank']} "
                      f"(the simulator's cost model on this device)", "",
                  f"Fit over {len(costs['steps'])} plan shapes, median of {costs['reps']}: mean |error| "
                  f"{costs['fit_errors']['mean_abs_rel_error']:.1%}.", "", "| plan | ms |", "|---|---|"]
        for r in costs["steps"]:
            if not r["label"].startswith("mixed"):
                lines.append(f"| {r['label']} | {r['median_seconds'] * 1e3:.2f} |")
    configs = stages.get("gemm_configs", {}).get("data")
    if configs:
        lines += ["", "## 4-bit GEMM: default configuration against the best variant (microseconds, CUDA graphs)", "",
                  "| K | N | M | default | best | best configuration |", "|---|---|---|---|---|---|"]
        for key in sorted({(r["K"], r["N"], r["M"]) for r in configs["decode"]}):
            rows = [r for r in configs["decode"] if (r["K"], r["N"], r["M"]) == key]
            best, base = min(rows, key=lambda r: r["ms"]), next(r for r in rows if r["default"])
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {base['ms'] * 1e3:.1f} | {best['ms'] * 1e3:.1f} | "
                         f"{best['config']} |")
        lines += ["", "| K | N | M | tiled kernel | dequantize + cuBLAS |", "|---|---|---|---|---|"]
        for r in configs["routes"]:
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['tiled_ms'] * 1e3:.1f} | {r['dequant_cublas_ms'] * 1e3:.1f} |")
        from gpu_gemm_configs import markdown_section as variants_section

        lines += variants_section(configs)
    serving = stages.get("serving", {}).get("data")
    if serving:
        from gpu_serving import markdown_section

        lines += markdown_section(serving)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """GEMM speedup over cuBLAS vs M, and decode step time vs batch with its floor."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gemm = report["stages"].get("gemm", {}).get("data", {}).get("timings", [])
    decode = (report["stages"].get("decode", {}).get("data") or {}).get("steps", [])
    if not gemm and not decode:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for bits in sorted({r["bits"] for r in gemm}, reverse=True):
        for shape in sorted({(r["K"], r["N"]) for r in gemm}):
            rows = [r for r in gemm if r["bits"] == bits and (r["K"], r["N"]) == shape]
            left.plot([r["M"] for r in rows], [r["speedup_vs_cublas"] for r in rows], marker="o",
                      label=f"W{bits} {shape[0]}x{shape[1]}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.set(xscale="log", xlabel="M (rows)", ylabel="speedup over cuBLAS fp16", title="low-bit GEMM")
    left.legend(fontsize=6)
    if decode:
        batches = [r["batch"] for r in decode]
        right.plot(batches, [r["eager_ms"] for r in decode], marker="o", label="eager")
        right.plot(batches, [r["graph_ms"] for r in decode], marker="o", label="CUDA graph")
        right.plot(batches, [r["floor_ms"] for r in decode], linestyle="--", color="grey", label="bandwidth floor")
        right.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step", title="decode step")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

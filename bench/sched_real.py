"""The scheduling policies on the REAL server, against the simulator on the same trace.

One trace of the nine suite tasks (their committed adapters, real prompts, Gamma arrivals)
is replayed open loop through the SDK (`inlaid/scheduling/replay.py`) against
`inlaid serve` on the default model, once per policy, each with a fresh server that logs
every step (`[scheduler] step_log`). The simulator runs the same trace with the same
policies on the fitted cost model. Reported: each policy's metrics, real vs simulated;
whether the simulator's ranking of the policies holds on the real server; the cost
model's error against the real executor's step times. The inlaid policy's predictor
starts from a state trained on the suite's calib split, as a deployed server would
start from its saved state. Writes bench/results/sched_real.{json,md,png}.

    .venv/bin/python bench/sched_real.py [--requests 150] [--load 0.8] [--threads 1] [--tag xeon]

`--tag NAME` simulates on sched_cost_model_NAME.json (bench/sched_cost.py --tag NAME) and
writes sched_real_NAME.*. `--quantized` serves the MLGPTQ 4-bit suite base, as `make run`
does (with `--tag amd4bit`, the cost model fitted on it: bench/sched_cost.py --quantized; with
`--suite-lengths inlaid/scheduling/data/suite_lengths_4bit.jsonl`, its own output lengths). The policy
`inlaid-tuned` (add it to --policies) is `inlaid` with the options the server's start-up
tuning chooses on that cost model (`[scheduler] autotune_cost_model`, inlaid/scheduling/autotune.py).

Takes 15-25 minutes on 2 cores (a server per policy), so `make bench` does not run it (no
`main`); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ADAPTERS = Path(__file__).parents[1] / "adapters"
VARIANTS = ("fifo", "mlfq", "vtc", "inlaid", "inlaid+fair")
REFIT_EVERY = 64  # the predictor refits as in a server, in the simulation too


def _variant(label: str, tuned_options: dict | None = None):
    from inlaid.scheduling.experiment import MAIN_VARIANTS, PolicyVariant

    if label == "inlaid-tuned":
        return PolicyVariant(label, "inlaid", dict(tuned_options or {}))
    return next(v for v in MAIN_VARIANTS if v.label == label)


def _run_server(label: str, trace, prompts, options: dict, threads: int, workdir: Path, policy: str = "",
                base: dict | None = None) -> tuple[list, list]:
    """Start a server with the variant's policy, replay `trace`, stop it; records and step log.
    base: EngineConfig fields of the base served (quantized_base_settings), else the fp32 model."""
    from inlaid.scheduling.replay import Replay
    from inlaid.scheduling.step_log import read_step_log
    from inlaid.serve.launcher import ServerProcess

    step_log = workdir / f"{label}.steps.jsonl"
    scheduler = {**options, "step_log": str(step_log)}
    base = dict(base or {})
    model = {"quantized_dir": base.pop("quantized_dir")} if "quantized_dir" in base else {}
    config = {
        "executor": {"threads": threads, **base},
        **({"model": model} if model else {}),
        "server": {"policy": policy or _variant(label).policy, "log_level": "WARNING", "max_pending_requests": 100_000},
        "tasks": {name: str(ADAPTERS / name) for name in trace.tasks},
        "scheduler": scheduler,
    }
    (workdir / label).mkdir()
    with ServerProcess(config, workdir / label) as server:
        server.wait_ready()
        records = asyncio.run(Replay(server.address, trace, prompts, progress=True).run())
    return records, read_step_log(step_log)


def _step_errors(steps: list[dict], cost, ranks: dict[str, int], block_size: int) -> dict:
    from inlaid.scheduling.cost_model import ChunkShape, StepFeatures

    predicted, measured, overheads = [], [], []
    for step in steps:
        chunks = [ChunkShape(n, start, adapter, ranks.get(adapter, 0) if adapter else 0, sample)
                  for n, start, adapter, sample in step["chunks"]]
        features = StepFeatures.of_chunks(chunks, len(step["loads"]), block_size)
        predicted.append(cost.step_seconds(features))
        measured.append(step["compute_s"])
        overheads.append(step["result_at"] - step["planned_at"] - step["compute_s"])
    errors = sorted(abs(p - m) / m for p, m in zip(predicted, measured) if m > 0)
    return {
        "steps": len(steps),
        "mean_abs_rel_error": sum(errors) / len(errors) if errors else float("nan"),
        "median_abs_rel_error": errors[len(errors) // 2] if errors else float("nan"),
        "total_bias": sum(predicted) / sum(measured) - 1 if measured else float("nan"),
        "mean_step_s": sum(measured) / len(measured) if measured else float("nan"),
        "mean_round_trip_overhead_s": sum(overheads) / len(overheads) if overheads else float("nan"),
    }


def compare(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--load", type=float, default=0.8, help="x the simulated FIFO saturation of the trace")
    parser.add_argument("--cv", type=float, default=4.0)
    parser.add_argument("--popularity", default="zipf")
    parser.add_argument("--threads", type=int, default=1, help="executor threads (as the cost model was measured)")
    parser.add_argument("--policies", default=",".join(VARIANTS))
    parser.add_argument("--calibration-requests", type=int, default=40)
    parser.add_argument("--render", action="store_true", help="rewrite the report and plot from sched_real.json")
    parser.add_argument("--tag", default="", help="the cost model sched_cost_model_TAG.json; writes sched_real_TAG.*")
    parser.add_argument("--suite-lengths", default=None,
                        help="the suite's recorded output lengths to draw the trace from (default: the committed fp32 "
                             "ones; bench/sched_suite_lengths.py --quantized records the 4-bit base's)")
    parser.add_argument("--quantized", action="store_true",
                        help="serve the MLGPTQ 4-bit suite base (the server's default in make run) instead of fp32; "
                             "pair it with a cost model fitted on it (bench/sched_cost.py --quantized)")
    args = parser.parse_args(argv)
    suffix = f"_{args.tag}" if args.tag else ""
    if args.render:
        from sched_report import plot_real, write_real_markdown

        report = json.loads((RESULTS / f"sched_real{suffix}.json").read_text())
        write_real_markdown(report, RESULTS / f"sched_real{suffix}.md")
        plot_real(report, RESULTS / f"sched_real{suffix}.png")
        return report

    from sched_sim import check_cost_model

    check_cost_model(parser, RESULTS / f"sched_cost_model{suffix}.json")  # before any server starts

    from inlaid.engine.adapter_config import read_adapter_spec
    from inlaid.engine.config import EngineConfig
    from inlaid.predictor import OnlineLengthPredictor
    from inlaid.scheduling.cost_model import StepCostModel
    from inlaid.scheduling.experiment import length_model, make_variant, suite_history, variant_options
    from inlaid.scheduling.metrics import summarize
    from inlaid.scheduling.simulator import EngineShape, isolated_latency, simulate
    from inlaid.scheduling.suite import load_suite_lengths, suite_prompts
    from inlaid.scheduling.traces import TraceSpec, generate_trace

    load_before = os.getloadavg()
    started = time.perf_counter()
    cost_file = RESULTS / f"sched_cost_model{suffix}.json"
    cost = StepCostModel.load(cost_file)
    shape = EngineShape.of(EngineConfig(model_dir=""))  # the server's engine defaults, on the CPU (its cap among them)
    records = load_suite_lengths(args.suite_lengths) if args.suite_lengths else load_suite_lengths()
    prompts = suite_prompts()
    history = suite_history(records, prompts, "calib")
    ranks = {p.name: read_adapter_spec(p.name, p).rank for p in sorted(ADAPTERS.iterdir()) if (p / "adapter_config.json").is_file()}
    spec = TraceSpec(rate=1.0, num_requests=args.requests, cv=args.cv, num_tasks=len(ranks), popularity=args.popularity,
                     suite_task_names=True, seed=11)
    base_trace = generate_trace(spec, [r for r in records if r.split == "eval"], ranks)
    base = None
    if args.quantized:
        from sched_cost import quantized_base_settings

        base = quantized_base_settings()
    workdir = Path(tempfile.mkdtemp(prefix="inlaid-sched-real-"))
    # Calibration: a burst on a FIFO server says how much slower this machine's steps are
    # than the cost model (CPU time, quiet machine); the simulation of the comparison runs
    # at that speed, so that both sides see the same load.
    burst = base_trace.scaled(1000.0)
    burst = type(burst)(burst.requests[:args.calibration_requests], burst.tasks, burst.meta)
    (workdir / "calibration").mkdir()
    _, calibration_steps = _run_server("fifo", burst, prompts, {}, args.threads, workdir / "calibration", base=base)
    raw_error = _step_errors(calibration_steps, cost, ranks, shape.block_size)
    slowdown = 1.0 / (1.0 + raw_error["total_bias"])
    machine_cost = cost.scaled(slowdown)
    capacity = summarize(simulate(base_trace.scaled(1000.0), make_variant(_variant("fifo"), machine_cost, shape),
                                  machine_cost, shape, prompts).requests)["throughput_rps"]
    trace = base_trace.scaled(args.load * capacity)
    trace.save(RESULTS / f"sched_trace_real{suffix}.jsonl")
    tuned = None
    if "inlaid-tuned" in args.policies.split(","):
        from inlaid.scheduling.autotune import tuned_options

        # As the server itself tunes: on the lengths of the base it serves.
        tuned, _ = tuned_options(str(cost_file), shape, len(ranks), log=print, lengths_file=args.suite_lengths)
    isolated = [isolated_latency(r, ranks.get(r.task or "", 0), machine_cost, shape) for r in trace.requests]

    state = workdir / "predictor-calib.npz"
    seeded = length_model("model", history)
    assert isinstance(seeded, OnlineLengthPredictor)
    seeded.save(state)
    runs = {}
    try:
        for label in args.policies.split(","):
            variant = _variant(label, tuned)
            options = variant_options(variant, cost, shape)
            if variant.policy == "inlaid":
                options["predictor_refit_every"] = REFIT_EVERY
                run_state = workdir / f"{label}.predictor.npz"
                shutil.copy(state, run_state)
                options["predictor_state"] = str(run_state)
            real_records, steps = _run_server(label, trace, prompts, options, args.threads, workdir, variant.policy,
                                              base)
            for record, seconds in zip(real_records, isolated):
                record.isolated_s = seconds
            sim_options = {k: v for k, v in options.items() if k != "predictor_state"}
            sim_variant = type(variant)(variant.label, variant.policy, sim_options, variant.length_model)
            sim = simulate(trace, make_variant(sim_variant, machine_cost, shape, history), machine_cost, shape, prompts)
            # The same simulation at this run's own machine speed (its real steps against the
            # model): one burst before the runs is a small sample, and the VM drifts.
            raw_errors = _step_errors(steps, cost, ranks, shape.block_size)
            own_factor = 1.0 / (1.0 + raw_errors["total_bias"])
            own_cost = cost.scaled(own_factor)
            own = simulate(trace, make_variant(sim_variant, own_cost, shape, history), own_cost, shape, prompts)
            same_length = sum(len(r.token_times) == t.output_tokens for r, t in zip(real_records, trace.requests))
            runs[label] = {
                "real": summarize(real_records, warmup_fraction=0.05),
                "sim": summarize(sim.requests, sim.steps, warmup_fraction=0.05, service_gap=sim.service_gap),
                "sim_own_calibration": summarize(own.requests, own.steps, warmup_fraction=0.05),
                "own_calibration_factor": own_factor,
                "cost_model_on_real_steps": raw_errors,
                "calibrated_cost_model_on_real_steps": _step_errors(steps, machine_cost, ranks, shape.block_size),
                "outputs_as_recorded": same_length / len(trace.requests),
            }
            print(label, json.dumps({k: runs[label]["real"]["latency_s"]["mean"] for k in ("real",)}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"command": " ".join(sys.argv[1:] if argv is None else argv),
              "machine_loadavg_before": load_before, "machine_loadavg_after": os.getloadavg(),
              "wall_s": time.perf_counter() - started, "trace": trace.summary(), "load": args.load,
              "simulated_capacity_rps": capacity, "threads": args.threads, "cost_model": cost.description,
              "cost_model_file": cost_file.name, "tuned_options": tuned,
              "suite_lengths": Path(args.suite_lengths).name if args.suite_lengths else "suite_lengths.jsonl",
              "base": ("MLGPTQ 4-bit suite base" + (", embedding/head in bf16" if "weight_dtype" in base else "")
                       if base is not None else "fp32"),
              "calibration": {"requests": args.calibration_requests, "slowdown": slowdown, "raw_error": raw_error},
              "runs": runs}
    (RESULTS / f"sched_real{suffix}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    from sched_report import plot_real, write_real_markdown

    write_real_markdown(report, RESULTS / f"sched_real{suffix}.md")
    plot_real(report, RESULTS / f"sched_real{suffix}.png")
    return report


if __name__ == "__main__":
    compare()

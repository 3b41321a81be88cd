"""What bench/e2e.py computes from its replays: a summary row per replay (serving metrics,
latency SLO attainment, tasks per step), the headline ratio, the agreement of greedy answers,
and bench/memory.py's committed tensor bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
LATENCY_SLOS_S = (5.0, 10.0, 20.0, 40.0)  # "answered within S seconds"
HEADLINE = ("inlaid-4bit-inlaid", "hf-peft")


def steps_between(steps: list[dict], started: float, ended: float):  # noqa: ANN201
    """The step log's steps planned during one replay, as metrics.StepRecords."""
    from inlaid.scheduling.metrics import StepRecord

    return [StepRecord(start_s=s["planned_at"], seconds=s["compute_s"], num_seqs=len(s["chunks"]),
                       num_tokens=sum(c[0] for c in s["chunks"]), adapters=len({c[2] for c in s["chunks"] if c[2]}),
                       loads=len(s["loads"]))
            for s in steps if started <= s["planned_at"] <= ended]


def baseline_batches(records: Sequence) -> list[list]:  # noqa: ANN001
    """Requests the baseline ran in one `generate` call: the server scheduled them at the same
    instant, so their admission times (client arrival + the server's queue time) agree to
    within the loopback's jitter; batches start at least one forward pass apart."""
    admitted = sorted((r for r in records if r.admitted_s is not None), key=lambda r: r.admitted_s)
    batches: list[list] = []
    for record in admitted:
        if batches and record.admitted_s - batches[-1][-1].admitted_s < 0.02:
            batches[-1].append(record)
        else:
            batches.append([record])
    return batches


def summaries(num_tasks: int, replays: list, logs: Path) -> list[dict[str, Any]]:
    """One row per replay: serving metrics, latency SLO attainment, tasks per step."""
    from inlaid.scheduling.metrics import summarize
    from inlaid.scheduling.step_log import read_step_log

    step_logs = {}
    for path in logs.glob("*.steps.jsonl"):
        step_logs[path.name.removesuffix(".steps.jsonl")] = read_step_log(path)
    rows = []
    for popularity, index, rate, one in replays:
        records = one.records
        if one.system == "hf-peft":
            summary = summarize(records)
            batches = baseline_batches(records)
            distinct = [len({r.task for r in batch}) for batch in batches]
            summary.update(steps=len(batches), mean_batch_seqs=float(np.mean([len(b) for b in batches])) if batches else 0.0,
                           tasks_per_step={"mean": float(np.mean(distinct)) if distinct else 0.0,
                                           "max": max(distinct, default=0)}, adapter_loads_per_s=0.0)
        else:
            summary = summarize(records, steps_between(step_logs.get(one.system, []), one.started, one.ended))
        finished = [r for r in records if r.finished]
        summary["latency_slo"] = {f"{slo:g}s": sum(r.latency_s <= slo for r in finished) / len(records)
                                  for slo in LATENCY_SLOS_S}
        summary["output_tokens"] = sum(len(r.token_ids) for r in finished)
        for unused in ("slo_attainment", "normalized_latency", "jct_by_task", "fairness_max_service_gap"):
            summary.pop(unused, None)  # no isolated latencies or fairness meter in a replay
        rows.append({"tasks": num_tasks, "popularity": popularity, "rate_index": index, "rate": rate,
                     "system": one.system, **summary})
    return rows


def headline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload: the baseline's best throughput and its p50 latency there; Inlaid's best
    throughput among its runs with a p50 latency at least as good; their ratio."""
    ours, theirs = HEADLINE
    lines = []
    keys = sorted({(row["tasks"], row["popularity"]) for row in report["workloads"]})
    for tasks, popularity in keys:
        rows = [row for row in report["workloads"] if (row["tasks"], row["popularity"]) == (tasks, popularity)]
        base = [row for row in rows if row["system"] == theirs]
        mine = [row for row in rows if row["system"] == ours]
        if not base or not mine:
            continue
        best = max(base, key=lambda row: row["throughput_rps"])
        bound = best["latency_s"]["p50"]
        within = [row for row in mine if row["latency_s"]["p50"] <= bound]
        match = max(within, key=lambda row: row["throughput_rps"]) if within else None
        peak = max(mine, key=lambda row: row["throughput_rps"])
        lines.append({
            "tasks": tasks, "popularity": popularity,
            "baseline_rps": best["throughput_rps"], "baseline_p50_s": bound, "baseline_rate": best["rate"],
            "inlaid_rps": match["throughput_rps"] if match else None,
            "inlaid_p50_s": match["latency_s"]["p50"] if match else None,
            "inlaid_rate": match["rate"] if match else None,
            "ratio_at_equal_or_better_p50": match["throughput_rps"] / best["throughput_rps"] if match else None,
            "ratio_of_peaks": peak["throughput_rps"] / best["throughput_rps"],
        })
    return lines


def agreement(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy answers of the same request on two systems: hf-peft vs inlaid-fp32-fifo (the
    same fp32 weights: an independent reference), inlaid-4bit-fifo vs inlaid-4bit-inlaid
    (the same base, other batches), and inlaid-fp32-fifo vs inlaid-4bit-fifo (what the 4-bit
    base changes: an outside reader found most answers differ and no report said so), each
    with the mean tokens a side generated (shorter answers favour requests/s)."""
    answers: dict[tuple, dict[str, list[int]]] = {}
    for r in records:
        if r["phase"] == "sweep" and not r["error"]:
            key = (r["tasks"], r["popularity"], r["rate_index"], r["request_id"])
            answers.setdefault(key, {})[r["system"]] = r["token_ids"]
    lines = []
    for left, right in (("hf-peft", "inlaid-fp32-fifo"), ("inlaid-4bit-fifo", "inlaid-4bit-inlaid"),
                        ("inlaid-fp32-fifo", "inlaid-4bit-fifo")):
        pairs = [(a[left], a[right]) for a in answers.values() if left in a and right in a]
        if pairs:
            lines.append({"systems": [left, right], "compared": len(pairs),
                          "identical": sum(x == y for x, y in pairs),
                          "first_token_identical": sum(x[:1] == y[:1] for x, y in pairs),
                          "mean_tokens": [sum(len(x) for x, _ in pairs) / len(pairs),
                                          sum(len(y) for _, y in pairs) / len(pairs)]})
    return lines


def computed_memory() -> dict[str, Any]:
    """bench/memory.py's committed figures for the default model (4-bit vs fp16 base, 100 adapters)."""
    path = BENCH / "results" / "memory.json"
    if not path.is_file():
        return {}
    memory = json.loads(path.read_text())
    name = memory["shapes"][0]["name"]
    return {"source": "bench/results/memory.json", "adapters": memory["adapters"], "rank": memory["rank"],
            "kv_tokens": memory["kv_tokens"], "measured": [m for m in memory.get("measured", []) if m["model"] == name]}

"""Records written from training and evaluation results: the adapter manifest and the
per-task output-length distributions (which the scheduler's length predictor trains on).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from inlaid.tasks.base import PACKAGED_DATA_DIR

OUTPUT_LENGTHS_FILE = PACKAGED_DATA_DIR / "output_lengths.json"


def write_manifest(adapters_dir: Path, results: dict | None) -> Path:
    """`adapters/MANIFEST.json`: per adapter its training record and its eval score vs the base."""
    entries = {}
    for config_path in sorted(adapters_dir.glob("*/adapter_config.json")):
        adapter_dir = config_path.parent
        training = json.loads((adapter_dir / "training.json").read_text())
        weights = adapter_dir / "adapter_model.safetensors"
        entry = {
            "task": training["task"],
            "rank": training["rank"],
            "lora_alpha": training["lora_alpha"],
            "target_modules": training["target_modules"],
            "steps": training["steps"],
            "batch_size": training["batch_size"],
            "lr": training["lr"],
            "train_split": training.get("train_split", "train"),
            "train_data_sha256": training["train_data_sha256"],
            "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "adapter_bytes": weights.stat().st_size,
            "first_loss": round(training["first_loss_mean10"], 4),
            "final_loss": round(training["final_loss_mean10"], 4),
            "training_command": training["command"],
        }
        task_results = (results or {}).get("tasks", {}).get(adapter_dir.name, {})
        if task_results:
            tuned = task_results.get(adapter_dir.name)
            base = task_results.get("base")
            metric = (tuned or base)["primary_metric"]
            entry["eval"] = {
                "metric": metric,
                "examples": (tuned or base)["examples"],
                "adapter": round(tuned["scores"][metric], 2) if tuned else None,
                "base": round(base["scores"][metric], 2) if base else None,
                "backend": (tuned or base).get("backend"),
                "dtype": (tuned or base).get("dtype"),
            }
        entries[adapter_dir.name] = entry
    path = adapters_dir / "MANIFEST.json"
    path.write_text(json.dumps({"base_model": "SmolLM2-135M-Instruct", "adapters": entries}, indent=1) + "\n")
    return path


def report_rows(results: dict) -> list[dict]:
    """The base-vs-adapter table (`markdown_table`) as records: one per (task, adapter) pair,
    scores on the task's primary metric in its stored [0, 100] scale (None where not run)."""
    from inlaid.tasks import TASK_NAMES
    from inlaid.tasks.eval_plan import BASE

    rows = []
    for task_name in [name for name in TASK_NAMES if name in results["tasks"]]:
        configs = results["tasks"][task_name]
        base = configs.get(BASE)
        for adapter in [name for name in configs if name != BASE] or [None]:
            tuned = configs.get(adapter) if adapter else None
            reference = tuned or base
            metric = reference["primary_metric"]
            base_score = base["scores"][metric] if base else None
            tuned_score = tuned["scores"][metric] if tuned else None
            rows.append({
                "task": task_name, "adapter": adapter, "metric": metric, "examples": reference["examples"],
                "base": base_score, "with_adapter": tuned_score,
                "gain": tuned_score - base_score if base_score is not None and tuned_score is not None else None,
            })
    return rows


def write_report(results: dict, path: Path) -> Path:
    """`inlaid tasks report --out`: JSON (`report_rows` beside the model and split) when the
    path ends in .json, else the Markdown table that `--markdown` writes."""
    from inlaid.tasks.evaluate import markdown_table

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        report = {"model": results["model"], "split": results["split"], "scale": "0-100",
                  "rows": report_rows(results)}
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    else:
        path.write_text(markdown_table(results))
    return path


def write_output_lengths(results: dict, tokenizer, path: Path = OUTPUT_LENGTHS_FILE) -> Path:
    """Per task: token counts of references (eval + calib) and of greedy outputs (base, adapter)."""
    from inlaid.tasks import get_task
    from inlaid.tasks.evaluate import length_stats

    record: dict = {"unit": "tokens, end-of-turn excluded", "tasks": {}}
    for task_name, configs in results["tasks"].items():
        task = get_task(task_name)
        references = [e["reference"] for split in ("eval", "calib") for e in task.load_split(split)]
        reference_lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
        record["tasks"][task_name] = {
            "max_new_tokens": task.max_new_tokens,
            "reference": length_stats(reference_lengths),
            "generated": {name: entry["output_tokens"] for name, entry in configs.items()},
        }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path

"""Records written from training and evaluation results: the adapter manifest and the
per-task output-length distributions (which the scheduler's length predictor trains on).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from inlaid.tasks.base import PACKAGED_DATA_DIR, write_text_atomic

OUTPUT_LENGTHS_FILE = PACKAGED_DATA_DIR / "output_lengths.json"


def write_manifest(adapters_dir: Path, results: dict | None, replace_smaller: bool = False) -> tuple[Path, str]:
    """`adapters/MANIFEST.json`: per adapter its training record and its eval score vs the base,
    and a one-line summary of what happened to the scores. The previous MANIFEST's score of an
    adapter these results do not cover is kept while its adapter_sha256 is unchanged (a report of
    one task's results used to drop every other score), and a score from fewer examples than the
    recorded one replaces it only with `replace_smaller` (a --limit 4 run replaced 128 examples)."""
    path = adapters_dir / "MANIFEST.json"
    previous = _previous_section(path, "adapters")
    entries = {}
    written: list[str] = []
    kept: list[str] = []
    kept_larger: list[str] = []
    dropped: list[str] = []
    left_out: list[str] = []
    for config_path in sorted(adapters_dir.glob("*/adapter_config.json")):
        adapter_dir = config_path.parent
        training = _training_record(adapter_dir)
        if not _is_suite_adapter(training):  # `quantize --suite` needs each entry's suite calibration data
            left_out.append(adapter_dir.name)
            continue
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
        name = adapter_dir.name
        old = previous.get(name) if isinstance(previous.get(name), dict) else {}
        old_eval = old.get("eval") if isinstance(old.get("eval"), dict) else None
        # A retrained adapter's old score would describe weights that are gone.
        same_adapter = old.get("adapter_sha256") == entry["adapter_sha256"]
        task_results = (results or {}).get("tasks", {}).get(name, {})
        if task_results:
            new_eval = _eval_entry(name, task_results)
            old_count = _count(old_eval, "examples") if old_eval and same_adapter else None
            if old_count is not None and old_count > new_eval["examples"] and not replace_smaller:
                entry["eval"] = old_eval
                kept_larger.append(f"{name} ({old_count} examples recorded, {new_eval['examples']} here)")
            else:
                entry["eval"] = new_eval
                written.append(name)
        elif old_eval and same_adapter:
            entry["eval"] = old_eval
            kept.append(name)
        elif old_eval:
            dropped.append(name)
        entries[name] = entry
    _write_if_changed(path, json.dumps({"base_model": "SmolLM2-135M-Instruct", "adapters": entries}, indent=1) + "\n")
    if left_out:
        print(f"inlaid tasks report: {path}: left out {', '.join(left_out)}: trained on a task of your own "
              "(train-adapter --task NAME=PATH); the manifest records the suite's tasks, which "
              "`inlaid quantize --suite` quantizes for", file=sys.stderr)
    for name in dropped:
        print(f"inlaid tasks report: {path}: dropped the eval score of {name}: its adapter changed since it was "
              "scored (adapter_sha256); evaluate it again", file=sys.stderr)
    if kept_larger:
        print(f"inlaid tasks report: {path}: kept the eval score from more examples for {', '.join(kept_larger)}; "
              "pass --replace-smaller to replace it", file=sys.stderr)
    return path, _summary(path, "eval score", written, kept, kept_larger, dropped)


def _is_suite_adapter(training: dict) -> bool:
    from inlaid.tasks import TASK_NAMES

    config = training.get("config")
    return training["task"] in TASK_NAMES and not (isinstance(config, dict) and config.get("data") is not None)


def _write_if_changed(path: Path, text: str) -> None:
    """Whole or not at all; and not at all when it would not change (a report with nothing new
    rewrote the packaged length record, touching a file of the installed package)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)


def _eval_entry(name: str, task_results: dict) -> dict:
    tuned = task_results.get(name)
    base = task_results.get("base")
    metric = (tuned or base)["primary_metric"]
    return {
        "metric": metric,
        "examples": (tuned or base)["examples"],
        "adapter": round(tuned["scores"][metric], 2) if tuned else None,
        "base": round(base["scores"][metric], 2) if base else None,
        "backend": (tuned or base).get("backend"),
        "dtype": (tuned or base).get("dtype"),
    }


def check_records(adapters_dir: Path, lengths: bool) -> None:
    """ValueError for what `write_manifest` (and with `lengths`, `write_output_lengths`) would
    fail on, checked before anything is written: an adapter without its training record, a
    damaged record being updated (whose recorded scores were silently dropped, an outside probe)."""
    _previous_section(adapters_dir / "MANIFEST.json", "adapters")
    for config_path in sorted(adapters_dir.glob("*/adapter_config.json")):
        _training_record(config_path.parent)
    if lengths:
        _previous_section(OUTPUT_LENGTHS_FILE, "tasks")


_TRAINING_FIELDS = ("task", "rank", "lora_alpha", "target_modules", "steps", "batch_size", "lr", "train_data_sha256",
                    "first_loss_mean10", "final_loss_mean10", "command")


def _training_record(adapter_dir: Path) -> dict:
    """The adapter's training.json, which `inlaid train-adapter` writes; ValueError naming the
    adapter when it has none (a PEFT adapter copied in was a FileNotFoundError) or lacks a field."""
    path = adapter_dir / "training.json"
    if not path.is_file():
        raise ValueError(f"{adapter_dir} has no training.json: the manifest records adapters `inlaid train-adapter` "
                         "trained; keep other adapters out of --adapters-dir")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error})") from None
    missing = [name for name in _TRAINING_FIELDS if not isinstance(record, dict) or name not in record]
    if missing:
        raise ValueError(f"{path} is not a train-adapter record: it lacks {', '.join(missing)}")
    return record


def _previous_section(path: Path, key: str) -> dict:
    """The `key` object of the record at `path` being updated (the MANIFEST's adapters, the
    length record's tasks): {} when there is none (or it is empty: nothing to lose); ValueError
    when it cannot be read (rewritten without a word, it lost every score it held)."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error}): what it records would be lost; restore it "
                         "(git checkout) or delete it to start afresh") from None
    section = record.get(key) if isinstance(record, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path} has no {key!r} object: what it records would be lost; restore it (git checkout) "
                         "or delete it to start afresh")
    return dict(section)


def _count(record: dict | None, key: str) -> int | None:
    value = (record or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _summary(path: Path, what: str, written: list[str], kept: list[str], kept_larger: list[str],
             dropped: list[str]) -> str:
    """`<path>: <what> written for ...; kept for ...`: one line per file, saying what changed."""
    parts = [f"{what} written for {', '.join(written) if written else 'none'}"]
    if kept:
        parts.append(f"kept for {', '.join(kept)} (not in these results)")
    if kept_larger:
        parts.append(f"kept (from more examples) for {', '.join(n.split(' ')[0] for n in kept_larger)}")
    if dropped:
        parts.append(f"dropped for {', '.join(dropped)} (adapter changed)")
    return f"{path}: {'; '.join(parts)}"


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


def write_output_lengths(results: dict, tokenizer, path: Path | None = None,
                         replace_smaller: bool = False) -> tuple[Path, str]:
    """Per task: token counts of references (eval + calib) and of greedy outputs (base, adapter),
    merged into the record at `path` (default `OUTPUT_LENGTHS_FILE`, looked up at call time):
    each (task, config) of the results replaces its own entry, every other is kept (a report of
    one task's results used to wipe the other tasks the length predictor trains on). An entry
    from fewer outputs than the recorded one replaces it only with `replace_smaller`."""
    from inlaid.tasks import get_task
    from inlaid.tasks.evaluate import length_stats

    path = Path(path if path is not None else OUTPUT_LENGTHS_FILE)
    record: dict = {"unit": "tokens, end-of-turn excluded", "tasks": _previous_section(path, "tasks")}
    written: list[str] = []
    kept_larger: list[str] = []
    for task_name, configs in results["tasks"].items():
        task = get_task(task_name)
        references = [e["reference"] for split in ("eval", "calib") for e in task.load_split(split)]
        reference_lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
        old = record["tasks"].get(task_name)
        generated = dict(old["generated"]) if isinstance(old, dict) and isinstance(old.get("generated"), dict) else {}
        for name, entry in configs.items():
            old_count = _count(generated.get(name) if isinstance(generated.get(name), dict) else None, "count")
            new_count = _count(entry, "examples")
            if old_count is not None and new_count is not None and old_count > new_count and not replace_smaller:
                kept_larger.append(f"{task_name}/{name} ({old_count} outputs recorded, {new_count} here)")
                continue
            generated[name] = entry["output_tokens"]
            written.append(f"{task_name}/{name}")
        record["tasks"][task_name] = {
            "max_new_tokens": task.max_new_tokens,
            "reference": length_stats(reference_lengths),
            "generated": generated,
        }
    kept = [name for name in record["tasks"] if name not in results["tasks"]]
    _write_if_changed(path, json.dumps(record, indent=1) + "\n")
    if kept_larger:
        print(f"inlaid tasks report: {path}: kept the lengths from more outputs for {', '.join(kept_larger)}; "
              "pass --replace-smaller to replace them", file=sys.stderr)
    return path, _summary(path, "lengths", written, kept, kept_larger, [])


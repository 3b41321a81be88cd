"""LoRA training on one task (`inlaid train-adapter`, whose command line is train_cli.py),
PEFT-format output, resumable.

A training sample is the chat-template prompt + the reference + the end-of-turn token; the
loss covers the reference and the end-of-turn token only. Batches are a deterministic
function of (seed, step), so a run resumed from its checkpoint continues exactly where it
stopped. Logits are computed only at the positions that carry loss: the tied 49k-vocab
head is a fifth of the model's compute and most positions are prompt.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from inlaid.cli_args import safetensors_problem
from inlaid.tasks.train_files import CHECKPOINT_DIR, SAVE_DIRS, save_adapter, save_checkpoint, settle_checkpoint

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    task: str
    model_dir: str
    out_dir: str
    rank: int = 16
    alpha: float | None = None      # default: 2 * rank
    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 10
    max_length: int = 256           # longer samples are dropped, not cut (cutting breaks the target)
    seed: int = 0
    save_every: int = 25
    threads: int | None = None
    save_dtype: str = "float16"     # the committed adapter's dtype: half the bytes of fp32
    precision: str = "bf16"         # base weights and matmuls: bf16 or fp32
    split: str = "train"
    data: str | None = None         # a task of one's own: its JSONL (inlaid/tasks/custom.py); None: the suite's
    data_sha256: str | None = None  # ... and its contents when the run began (`with_data_hash`)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def resume_settings(self) -> dict:
        """What a checkpoint must have been trained with to be resumed by this run: everything
        that shapes the weights or the batches of a step. Not --steps: a larger one continues
        the run (the cosine schedule then follows the new total); threads, save cadence and
        the saved dtype do not change the training either."""
        return {"task": self.task, "model": Path(self.model_dir).name, "rank": self.rank,
                "lora_alpha": self.lora_alpha, "batch_size": self.batch_size,
                "lr": self.lr, "warmup_steps": self.warmup_steps, "max_length": self.max_length,
                "seed": self.seed, "precision": self.precision, "split": self.split,
                # the file's contents, not only its path: a file edited in place resumed silently
                **({"data": self.data, "data_sha256": self.data_sha256} if self.data is not None else {})}

    def with_data_hash(self) -> TrainConfig:
        """This config with its task file's sha256 taken now, once: every check and save of the
        run compares that one (hashed at each save, a file edited mid-run changed it there)."""
        from inlaid.tasks.base import file_sha256

        return self if self.data is None else replace(self, data_sha256=file_sha256(Path(self.data)))

    @property
    def task_spec(self) -> str:
        """What `get_task` takes: the suite task's name, or NAME=PATH for one's own."""
        return self.task if self.data is None else f"{self.task}={self.data}"


def tokenize_sample(tokenizer, messages: list[dict], reference: str) -> tuple[list[int], int]:
    """Token ids of prompt + reference + end-of-turn, and the prompt's length."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, len(prompt_ids)


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of batch `step`: walk through seeded per-epoch permutations."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), count)
        permutation = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
        indices.extend(permutation[offset:offset + batch_size - len(indices)])
    return indices


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _collate(samples: list[tuple[list[int], int]], pad_id: int, device):
    import torch

    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids.to(device), attention.to(device), labels.to(device)


def _loss(peft_model, input_ids, attention, labels):
    import torch.nn.functional as F

    causal_lm = peft_model.base_model.model
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    # position t predicts token t+1: keep only positions whose next token carries loss
    next_labels = labels[:, 1:]
    keep = next_labels != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), next_labels[keep])


def train(config: TrainConfig, command: str = "") -> Path:
    """Train (or resume, or find finished) the adapter of `config`; its directory."""
    with warnings.catch_warnings():  # only here: a caller's own filters stay as they were
        # transformers' deprecation PEFT's training path sets off at every run: not the user's to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _train(config, command)


def _train(config: TrainConfig, command: str) -> Path:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inlaid.tasks import TaskError, get_task
    from inlaid.tasks.base import file_sha256

    if config.threads:
        torch.set_num_threads(config.threads)
    task = get_task(config.task_spec)
    train_path = task.split_path(config.split)
    data_sha256 = file_sha256(train_path)
    examples = task.load_split(config.split)
    if config.data is not None and config.data_sha256 not in (None, data_sha256):
        raise TaskError(f"{config.data} changed since this run was checked against --out; run the command again")
    config = replace(config, data_sha256=data_sha256) if config.data is not None else config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 base weights on the CPU too: with AVX512-BF16 a bf16 matmul is ~2.6x faster than
    # fp32 here (measured 83 vs 32 GFLOP/s, 1 thread); the LoRA weights stay fp32.
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    tokenized = [tokenize_sample(tokenizer, e["messages"], e["reference"]) for e in examples]
    samples = [s for s in tokenized if len(s[0]) <= config.max_length]
    if not samples:
        raise TaskError(f"no training sample of task '{config.task}' fits in {config.max_length} tokens "
                        "(--max-length; longer samples are dropped, not cut)")
    if len(samples) < len(tokenized):  # said, not only counted in training.json (an outside probe)
        longest = max(len(s[0]) for s in tokenized)
        print(f"{len(tokenized) - len(samples)} of {len(tokenized)} training samples of task '{config.task}' are "
              f"longer than {config.max_length} tokens (--max-length; the longest has {longest}) and are left out, "
              "not cut", file=sys.stderr)

    out_dir = Path(config.out_dir)
    checkpoint = out_dir / CHECKPOINT_DIR
    settle_checkpoint(out_dir)
    base = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=dtype).to(device)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    start_step, losses = 0, []
    if (checkpoint / "state.json").is_file():
        model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
        state = json.loads((checkpoint / "state.json").read_text())
        start_step, losses = state["step"], state["losses"]
        print(f"resuming {config.task} from step {start_step}", file=sys.stderr)
    else:
        torch.manual_seed(config.seed)  # LoRA A is initialised at random
        lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # LoRA weights train in fp32 even over a bf16 base
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    if (checkpoint / "optimizer.pt").is_file() and start_step:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device))

    model.train()
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
                    desc=f"train {config.task} r{config.rank}", file=sys.stderr)
    started = time.time()
    for step in progress:
        batch = [samples[i] for i in batch_indices(len(samples), config.batch_size, config.seed, step)]
        input_ids, attention, labels = _collate(batch, tokenizer.pad_token_id or tokenizer.eos_token_id, device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            loss = _loss(model, input_ids, attention, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(round(float(loss.detach()), 4))
        progress.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        done = step + 1
        if done % config.save_every == 0 or done == config.steps:
            save_checkpoint(model, optimizer, out_dir,
                             {"step": done, "losses": losses, "settings": config.resume_settings()})

    info = {
        "task": config.task,
        "base_model": Path(config.model_dir).name,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": LORA_TARGET_MODULES,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "train_examples_used": len(samples),
        "train_split": config.split,
        "train_data_sha256": data_sha256,
        "final_loss_mean10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "first_loss_mean10": sum(losses[:10]) / max(1, len(losses[:10])),
        "device": device.type,
        "seconds_this_run": round(time.time() - started, 1),
        "command": command,
        "config": asdict(config),
    }
    if start_step >= config.steps and _same_record(out_dir, info):
        # A rerun of a finished run: nothing trained, so the adapter and its record stay as
        # they are, their mtimes too (a sync or build rule keyed on them saw a new adapter).
        print(f"{config.task}: already trained to step {config.steps} with these settings; nothing rewritten",
              file=sys.stderr)
        return out_dir
    save_adapter(model, out_dir, config.save_dtype,
                  {"training.json": json.dumps(info, indent=2), "losses.json": json.dumps(losses)})
    # what the run did, in a line (the path alone was printed: an outside probe); stdout keeps the path
    window = min(10, len(losses) // 2 or 1)  # the first and last steps, apart where there are two or more
    first, last = losses[:window], losses[-window:]
    print(f"{config.task}: {config.steps} steps of {config.batch_size} over {len(samples)} examples, loss "
          f"{sum(first) / len(first):.3f} (first {len(first)} steps) -> {sum(last) / len(last):.3f} (last "
          f"{len(last)}), {info['seconds_this_run']:.0f} s this run; adapter and training.json in {out_dir}",
          file=sys.stderr)
    return out_dir


# Fields that say how a run went, not what the adapter is: a rerun that trains nothing
# differs there alone (on another device, with other --threads) and must not rewrite.
_RUN_ONLY_FIELDS = ("seconds_this_run", "command", "device")
_RUN_ONLY_CONFIG = ("threads", "save_every")


def _same_record(out_dir: Path, info: dict) -> bool:
    """Whether `out_dir` already holds the adapter and a training.json recording `info` (all
    but the fields of the run itself)."""
    if not all((out_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_config.json")):
        return False  # a file of the adapter gone: the rerun writes it again
    if safetensors_problem(out_dir / "adapter_model.safetensors"):
        return False  # damaged (cut short): written again from the checkpoint, not kept
    try:
        recorded = json.loads((out_dir / "training.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        return False

    def essence(record: dict) -> dict:
        # a suite task's data keys are None: a record from before they existed is the same run
        config = {k: v for k, v in record["config"].items()
                  if k not in _RUN_ONLY_CONFIG and not (k in ("data", "data_sha256") and v is None)}
        return {**{k: v for k, v in record.items() if k not in _RUN_ONLY_FIELDS}, "config": config}

    # Through JSON: `info` holds tuples that its file holds as lists.
    return essence(recorded) == essence(json.loads(json.dumps(info)))


def resume_problem(config: TrainConfig) -> str | None:
    """Why the checkpoint in `<out>/checkpoint/` cannot be resumed by `config`, or None (none
    there, or the same settings). A run with another --rank used to resume it silently:
    the adapter kept the old rank while training.json recorded the new one."""
    checkpoint = Path(config.out_dir) / CHECKPOINT_DIR
    state_file = checkpoint / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        recorded = state.get("settings")
        if recorded is None:  # a checkpoint from before settings were recorded: its adapter config
            adapter = json.loads((checkpoint / "adapter_config.json").read_text())
            recorded = {"rank": adapter["r"], "lora_alpha": adapter["lora_alpha"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return (f"--out {config.out_dir}: the checkpoint in {checkpoint} cannot be read ({error}); "
                "pass --restart to discard it or choose another --out")
    wanted = config.resume_settings()
    differing = [f"{key} {recorded[key]} there, {wanted[key]} here" for key in wanted
                 if key in recorded and recorded[key] != wanted[key]]
    done = state.get("step")
    if isinstance(done, int) and done > config.steps:  # the adapter would hold more steps than recorded
        differing.append(f"{done} steps done there, --steps {config.steps} here")
    if not differing:
        return None
    return (f"--out {config.out_dir} holds a checkpoint (step {done}) of a run with other settings "
            f"({'; '.join(differing)}); pass --restart to discard it or choose another --out")


def out_problem(config: TrainConfig, restart: bool = False) -> str | None:
    """Why this run must not write into --out, or None: a finished adapter (no checkpoint) of other
    settings was overwritten, a foreign directory written into. --restart lifts only the first."""
    out = Path(config.out_dir)
    has_checkpoint = (out / CHECKPOINT_DIR / "state.json").is_file()
    try:
        record = json.loads((out / "training.json").read_text())
        record = record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None
    except (OSError, ValueError):
        record = None
    if (not has_checkpoint and record is None and out.is_dir()
            and any(entry.name not in SAVE_DIRS for entry in out.iterdir())):  # a bare checkpoint/ is a crash's
        why = ("its training.json is not a train-adapter record" if (out / "training.json").is_file()
               else "no training.json or checkpoint")
        return f"--out {out} is not empty and holds no train-adapter run ({why}); choose a new or empty directory"
    if restart or has_checkpoint or record is None:
        return None if restart else resume_problem(config)
    # training.json's own fields first: the config of older records lacks some (split)
    recorded = {**record["config"], "model": record.get("base_model"), "lora_alpha": record.get("lora_alpha"),
                "split": record.get("train_split", record["config"].get("split", "train")),
                "data_sha256": record.get("train_data_sha256")}
    wanted = config.resume_settings()
    differing = [f"{key} {recorded[key]} there, {wanted[key]} here" for key in wanted
                 if recorded.get(key) is not None and recorded[key] != wanted[key]]
    if record.get("steps") != config.steps:  # no checkpoint to continue from: it would retrain from step 0
        differing.append(f"steps {record.get('steps')} there, {config.steps} here")
    return (f"--out {out} holds a finished adapter of a run with other settings ({'; '.join(differing)}); "
            "pass --restart to retrain and replace it, or choose another --out") if differing else None

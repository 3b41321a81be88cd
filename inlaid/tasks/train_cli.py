"""`inlaid train-adapter`'s command line: its options, the checks made before the model loads,
and the run (the training itself is train.py)."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from inlaid.build_lock import exclusive_run
from inlaid.cli_args import model_dir_problem, positive_float, positive_int, writable_dir_problem
from inlaid.tasks.train import TrainConfig, out_problem, train
from inlaid.tasks.train_files import SAVE_DIRS, kept_after_interrupt, settle_checkpoint


def rank_problem(rank: int) -> str | None:
    """--rank above what any engine can serve (refused), or None."""
    from inlaid.engine.config import MAX_LORA_RANK

    if rank > MAX_LORA_RANK:
        return f"--rank {rank}: above {MAX_LORA_RANK}, the largest max_lora_rank an Inlaid engine can serve"
    return None


def rank_warning(rank: int) -> str | None:
    """--rank above the default serving config's max_lora_rank: trained, but `inlaid generate`
    and a server with the default config refuse the adapter."""
    from inlaid.engine.config import EngineConfig

    default = EngineConfig.max_lora_rank
    if rank <= default:
        return None
    return (f"warning: --rank {rank} is above the default max_lora_rank {default}: `inlaid generate` and a server "
            f"with the default config will refuse this adapter; serve it with `max_lora_rank = {rank}` (or more) "
            "under [executor] in the server config (`inlaid eval` sizes its engine to the adapter)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Counts and sizes are checked by their argparse types, which name the option and exit 2
    # before anything loads: `--alpha -1` wrote lora_alpha -1.0, `--save-every -1` and
    # `--threads 0` were taken silently.
    parser.add_argument("--task", required=True,
                        help="a task of the suite (inlaid tasks list), or one of your own: NAME=PATH.jsonl, one "
                             "example per line as a calibration file's (docs/tasks.md)")
    parser.add_argument("--model", type=Path, default=None,
                        help="base model directory (default: SmolLM2-135M-Instruct in the cache)")
    parser.add_argument("--out", type=Path, default=None, help="adapter directory (default: adapters/<task>)")
    parser.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=positive_float, default=None, help="lora_alpha (default 2*rank)")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples a step (default 8)")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="peak learning rate (default 5e-4)")
    parser.add_argument("--max-length", type=positive_int, default=256,
                        help="tokens of prompt + answer; longer examples are left out, not cut (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order (default 0)")
    parser.add_argument("--save-every", type=positive_int, default=25,
                        help="steps between the checkpoints a rerun resumes from (default 25)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--split", default="train", help="split to train on (default train)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                        help="base weights' precision while training (default bf16; the LoRA trains in fp32)")
    parser.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="the saved adapter's dtype (default float16)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the checkpoint in --out and retrain, replacing a finished adapter there")


def _input_problem(args: argparse.Namespace, out_dir: Path) -> str | None:
    """Why the run could not start or finish, known before the model loads, or None: a file
    or unwritable directory as --out failed with NotADirectoryError after a minute of
    training, and a missing --model reached Hugging Face as a repo id."""
    from inlaid.tasks import TaskError, get_task

    if problem := (model_dir_problem(args.model) or writable_dir_problem(out_dir, "--out")
                   or rank_problem(args.rank)):
        return problem
    try:
        get_task(args.task).split_path(args.split)
    except TaskError as error:
        return str(error)
    return None


def run(args: argparse.Namespace) -> int:
    from inlaid.tasks.custom import split_task_spec

    # A task of one's own: its name names the adapter's folder; the path is kept absolute (a
    # resumed run from another directory reads the same file, and the checkpoint records it).
    name, data = split_task_spec(args.task) or (args.task, None)
    out_dir = Path(args.out).expanduser() if args.out else Path("adapters") / name  # --out=~/a: no shell expands it
    try:  # one run an --out at a time: a second one's settle_checkpoint undid the first's save
        with exclusive_run(out_dir, OutBusyError):
            return _run_in(args, name, data, out_dir)
    except OutBusyError as error:
        print(f"inlaid train-adapter: {error}", file=sys.stderr)
        return 2


class OutBusyError(RuntimeError):
    """Another train-adapter run holds --out."""


def _run_in(args: argparse.Namespace, name: str, data: str | None, out_dir: Path) -> int:
    from inlaid.models.prepare import default_model_dir

    settle_checkpoint(out_dir)  # a save a kill cut short: before --out is judged by what it holds
    if problem := _input_problem(args, out_dir):
        print(f"inlaid train-adapter: {problem}", file=sys.stderr)
        return 2
    config = TrainConfig(
        task=name, data=str(Path(data).expanduser().resolve()) if data else None,
        model_dir=str(args.model or default_model_dir()), out_dir=str(out_dir),
        rank=args.rank, alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        max_length=args.max_length, seed=args.seed, save_every=args.save_every, threads=args.threads,
        save_dtype=args.save_dtype, precision=args.precision, split=args.split,
    ).with_data_hash()
    if warning := rank_warning(config.rank):
        print(f"inlaid train-adapter: {warning}", file=sys.stderr)
    if problem := out_problem(config, restart=args.restart):
        print(f"inlaid train-adapter: {problem}", file=sys.stderr)
        return 2
    if args.restart:
        for save_dir in SAVE_DIRS:
            shutil.rmtree(out_dir / save_dir, ignore_errors=True)
    command = "inlaid train-adapter " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    try:
        out = train(config, command=command)
    except KeyboardInterrupt:  # (SIGTERM too) what was kept, before inlaid/cli.py's "interrupted"
        print(f"inlaid train-adapter: {kept_after_interrupt(out_dir, config.steps)}", file=sys.stderr)
        raise
    print(out)
    return 0

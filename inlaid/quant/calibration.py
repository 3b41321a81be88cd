"""Calibration samples: JSONL examples turned into token sequences (prompt + reference answer).

Each line: {"id", "task", "messages": [{"role", "content"}...], "reference", ...}. The sample
text is the chat template of the messages with the generation prompt, then the reference
answer and the end-of-turn token, so the Hessian sees the activations of both the prompt
and the answer the adapter was trained to produce.

Reading and checking a calibration file needs no torch (the server's coordinator checks a
file it is given); only tokenizing and batching import it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from inlaid.quant.errors import CalibrationDataError

if TYPE_CHECKING:
    import torch

END_OF_TURN = "<|im_end|>"
# Padded tokens per calibration batch: sequences are grouped by length, and smaller batches
# waste less on padding (the task suite: 6 % at 1024, 21 % at 4096) at no matmul speed cost.
CALIBRATION_BATCH_TOKENS = 1024
# The largest calibration sample (one JSONL line, in bytes) any path accepts: `inlaid quantize`,
# `quantize-add` and the server's add_task alike. A sample's UTF-8 bytes bound its tokens
# (byte-level BPE): 32 KiB is ~8k tokens of ordinary text (the default model's context). The
# check reads no more than this of a line: a 20 MB line read whole (and tokenized whole) took
# `inlaid quantize` to 20 GB.
MAX_CALIBRATION_LINE_BYTES = 32 * 1024
# Tokens of a sample the quantizer uses (--max-tokens' default): the calibration forward passes
# and mlgptq's cost probe alike (`first_tokens`).
DEFAULT_MAX_TOKENS = 512


@dataclass
class CalibrationTask:
    """A task to calibrate for: its name, its adapter (None = base model), its samples."""

    name: str
    adapter_dir: Path | None
    calib_path: Path


def parse_task_argument(text: str) -> CalibrationTask:
    """`name=ADAPTER_DIR:CALIB.jsonl` (ADAPTER_DIR may be empty for the base model)."""
    if "=" not in text or ":" not in text.split("=", 1)[1]:
        raise CalibrationDataError(f"--task '{text}': expected name=ADAPTER_DIR:CALIB.jsonl")
    name, rest = text.split("=", 1)
    adapter, calib = rest.rsplit(":", 1)
    if not name or not calib:
        raise CalibrationDataError(f"--task '{text}': expected name=ADAPTER_DIR:CALIB.jsonl")
    return CalibrationTask(name=name, adapter_dir=Path(adapter) if adapter else None, calib_path=Path(calib))


CALIBRATION_ROLES = ("system", "user", "assistant")


def read_calibration_examples(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` samples of a JSONL calibration file (every one when None), each
    line checked (CalibrationDataError names the file and line)."""
    examples: list[dict] = []
    for example in _checked_examples(path):
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise CalibrationDataError(f"calibration file {path} holds no samples")
    return examples


def check_calibration_file(path: Path, max_file_bytes: int | None = None, max_line_bytes: int | None = None) -> int:
    """Check every line of a calibration file, one line at a time (nothing kept), and return
    how many samples it holds: a bad line past --max-samples was never read, so the file was
    accepted here and refused wherever it was later used whole (the server's add_task). The
    bounds, when given, refuse a larger file or sample without reading past them (what a
    server checking a client's file must not hold in memory)."""
    count = sum(1 for _ in _checked_examples(path, max_file_bytes, max_line_bytes))
    if not count:
        raise CalibrationDataError(f"calibration file {path} holds no samples")
    return count


def _checked_examples(path: Path, max_file_bytes: int | None = None,
                      max_line_bytes: int | None = None):  # type: ignore[no-untyped-def]
    """Each sample of the file, checked (CalibrationDataError naming the file and line), read
    one line at a time and, with `max_line_bytes`, never more than that of one line."""

    def refuse(problem: str) -> CalibrationDataError:
        return CalibrationDataError(f"calibration file {path}{problem}")

    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then says what it is
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise refuse(" does not exist") from None
    except OSError as error:
        raise refuse(f" cannot be read: {error.strerror or error}") from None
    info = os.fstat(fd)
    problem = (" is a directory; name a JSONL file" if stat.S_ISDIR(info.st_mode) else
               " is not a regular file (a device, FIFO or socket?)" if not stat.S_ISREG(info.st_mode) else
               f" holds {info.st_size} bytes; at most {max_file_bytes} are accepted"
               if max_file_bytes is not None and info.st_size > max_file_bytes else "")
    if problem:
        os.close(fd)
        raise refuse(problem)
    with open(fd, "rb") as handle:
        read = number = 0
        while line := handle.readline(-1 if max_line_bytes is None else max_line_bytes + 2):
            number += 1
            read += len(line)
            if max_file_bytes is not None and read > max_file_bytes:  # it grew while being read
                raise refuse(f" holds more than {max_file_bytes} bytes")
            content = line.rstrip(b"\r\n")
            if max_line_bytes is not None and len(content) > max_line_bytes:
                raise refuse(f":{number}: a sample over {max_line_bytes} bytes (the limit on one calibration "
                             "line; the quantization uses only a sample's first --max-tokens tokens, 512 by "
                             "default): shorten it")
            if not content.strip():
                continue
            try:
                example = parse_sample(content)
            except ValueError as error:
                raise refuse(f":{number}: {error}") from None
            yield example


def parse_sample(line: str | bytes) -> dict:
    """One JSONL calibration sample, checked (ValueError saying what is wrong): the rule of
    `read_calibration_examples`, also the server's for the files add_task takes."""
    try:
        example = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError("not JSON this reader accepts (nested too deeply)") from None
    messages = example.get("messages") if isinstance(example, dict) else None
    if not isinstance(messages, list) or not messages or not isinstance(example.get("reference"), str):
        raise ValueError("each line needs 'messages' (a non-empty list) and 'reference' (a string)")
    problem = _messages_problem(messages)
    if problem:  # else the chat template failed on it later, in the re-quantization job
        raise ValueError(problem)
    # the tokenizer refused them with a TypeError, after the model had loaded
    check_encodable({**{f"messages[{index}].content": message["content"] for index, message in enumerate(messages)},
                     "reference": example["reference"]})
    if not example["reference"].strip() and not any(message["content"].strip() for message in messages):
        raise ValueError("the sample holds no text: every message's content and the reference are empty or "
                         "blank (it would calibrate on the chat template alone)")
    return example


def check_encodable(texts: dict[str, str]) -> None:
    """ValueError naming the first of `texts` (where -> text) holding a lone UTF-16 surrogate:
    JSON's \\udXXX escapes decode to them, and UTF-8 (a tokenizer, a results file) cannot
    carry one."""
    for where, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate ({text[error.start]!r} at character "
                             f"{error.start}): not text UTF-8 can carry") from None


def _messages_problem(messages: list) -> str | None:
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CALIBRATION_ROLES \
                or not isinstance(message.get("content"), str):
            return (f"messages[{index}] must be {{'role': one of {', '.join(CALIBRATION_ROLES)}, "
                    f"'content': a string}}, got {message!r:.120}")
    return None


def sample_text(example: dict, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True, tokenize=False)
    return prompt + example["reference"] + END_OF_TURN


def tokenize_examples(examples: list[dict], tokenizer, max_tokens: int) -> list[torch.Tensor]:
    """One int64 token tensor per sample, truncated to `max_tokens`."""
    import torch

    sequences = []
    for example in examples:
        ids = tokenizer(sample_text(example, tokenizer), add_special_tokens=False)["input_ids"]
        sequences.append(torch.tensor(first_tokens(ids, max_tokens), dtype=torch.long))
    return sequences


def first_tokens(ids: list[int], max_tokens: int | None) -> list[int]:
    """What of a sample's tokens the quantizer uses: its first `max_tokens` (--max-tokens;
    None: all). The calibration forward passes and mlgptq's cost probe share this rule, so a
    long sample costs the probe no more than it costs the Hessians."""
    return ids if max_tokens is None else ids[:max_tokens]


def truncated_prompt_answer(prompt_ids: list[int], answer_ids: list[int],
                            max_tokens: int | None) -> tuple[list[int], list[int]]:
    """A (prompt, answer) token pair cut to the sample's first `max_tokens` tokens
    (`first_tokens` of prompt + answer): the answer keeps what fits after the prompt,
    nothing when the prompt alone fills the limit. A pair within the limit is unchanged."""
    kept_prompt = first_tokens(prompt_ids, max_tokens)
    room = None if max_tokens is None else max_tokens - len(kept_prompt)
    return kept_prompt, first_tokens(answer_ids, room)


@dataclass
class TokenBatch:
    """Right-padded sequences [batch, length] and which positions are real tokens.

    Right padding needs no attention mask under causal attention: real tokens never see the
    pads after them, so their activations are exact; pads are left out of every Hessian.
    """

    input_ids: torch.Tensor
    token_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.token_mask.sum())


def make_batches(sequences: list[torch.Tensor], max_batch_tokens: int, pad_id: int) -> list[TokenBatch]:
    """Group sequences of similar length (sorted) into padded batches of bounded size."""
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    batches: list[TokenBatch] = []
    current: list[torch.Tensor] = []
    for index in order:
        sequence = sequences[index]
        if current and (len(current) + 1) * len(sequence) > max_batch_tokens:
            batches.append(_pad(current, pad_id))
            current = []
        current.append(sequence)
    if current:
        batches.append(_pad(current, pad_id))
    return batches


def _pad(sequences: list[torch.Tensor], pad_id: int) -> TokenBatch:
    import torch

    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    token_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        token_mask[row, : len(sequence)] = True
    return TokenBatch(input_ids=input_ids, token_mask=token_mask)

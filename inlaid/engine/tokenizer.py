"""Tokenizer, chat template and streaming detokenizer. Torch-free (coordinator side).

Uses the `tokenizers` library on the model directory's tokenizer.json and renders the
chat template with jinja2 the way transformers does, so the coordinator never imports
torch or transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from inlaid.engine.config import ModelLoadError


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(path))
        self._literal: _HFTokenizer | None = None  # encode_literal's (`enable_literal`)
        # The markers: every added token (special or not: Qwen's <tool_call>, a fine-tune's
        # `add_tokens` chat markers) but GPT-NeoX's non-special runs of spaces, which are text.
        markers = [added for added in self._tok.get_added_tokens_decoder().values()
                   if added.special or added.content.strip()]
        self.marker_strings: tuple[str, ...] = tuple(added.content for added in markers)
        self.marker_ids = frozenset(self._tok.token_to_id(marker) for marker in self.marker_strings)
        # Matched in the normalized text, a marker can hide in raw text ("＜tool_call＞" under NFKC).
        self.markers_normalized = self._tok.normalizer is not None and any(added.normalized for added in markers)
        # Longest first: at one position the longest marker wins, as the tokenizer matches them.
        self.marker_pattern = re.compile("(" + ("|".join(
            re.escape(marker) for marker in sorted(self.marker_strings, key=len, reverse=True)) or "(?!)") + ")")
        config_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        template_path = model_dir / "chat_template.jinja"
        if template is None and template_path.is_file():
            template = template_path.read_text()
        self._chat_template: jinja2.Template | None = None
        if isinstance(template, str):
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._chat_template = env.from_string(template)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # Special tokens come from the chat template text itself; add none of our own.
        return self._tok.encode(text, add_special_tokens=False).ids

    def enable_literal(self) -> None:
        """Make `encode_literal`'s tokenizer now (at start, not on the loop at the first request):
        a copy of this one, from memory (the file may have changed since), with each marker marked
        special and special tokens encoded as text. A tokenizer of its own: the flag is state, and
        `encode` must never see it set."""
        if self._literal is not None:
            return
        spec = json.loads(self._tok.to_str())
        for added in spec.get("added_tokens") or []:
            added["special"] = added.get("special") or added["content"] in self.marker_strings
        literal = _HFTokenizer.from_str(json.dumps(spec))
        literal.encode_special_tokens = True
        self._literal = literal

    def encode_literal(self, text: str) -> list[int]:
        """`text` with its markers' strings as plain text: "<|im_end|>" typed by a user is the
        characters it shows, never the end of a turn."""
        self.enable_literal()
        assert self._literal is not None
        return self._literal.encode(text, add_special_tokens=False).ids

    def holds_marker(self, text: str) -> bool:
        return self.marker_pattern.search(text) is not None  # one scan (`in` per marker: 17 scans)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError("each chat message needs 'role' and 'content'")
        return self._chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


class StreamingDetokenizer:
    """Turns a growing list of output tokens into text deltas.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; the
    decoder then yields U+FFFD. Such a tail is held back until the character completes.
    Stop strings are matched on the whole text; text that could be the start of a stop
    string is held back too, so a stream never shows a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.token_ids: list[int] = []
        self.text = ""  # decoded text of all complete characters so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return the newly visible text (may be empty)."""
        self.token_ids.append(token_id)
        decoded = self.tokenizer.decode(self.token_ids)
        if decoded.endswith("\ufffd"):
            return ""
        self.text = decoded
        for stop in self.stop:
            position = self.text.find(stop)
            if position != -1:
                self.text = self.text[:position]
                self.stopped = True
        if self.stopped:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> str:
        """Everything not yet emitted (the held-back tail), at the end of the sequence. A
        character the last tokens left unfinished is dropped, not shown as U+FFFD (as vLLM's
        detokenizer does): the text is what the complete characters say."""
        if not self.stopped:
            decoded = self.tokenizer.decode(self.token_ids)
            if not decoded.endswith("\ufffd"):
                self.text = decoded
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:length]):
                    longest = max(longest, length)
                    break
        return longest

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

"""`inlaid eval`'s progress bar moves while a batch decodes, through the real engine on the
tiny model. It counted finished requests: a mixed batch's requests finish near the end, so
it sat at 0 % for almost the whole run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tqdm import tqdm

from inlaid.tasks.generation import GenerationRequest, engine_available, generate_with_engine


def test_the_eval_bar_counts_tokens_while_requests_decode(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not engine_available():
        pytest.skip("Inlaid's engine runner is not available")
    from inlaid.engine import Engine

    # Each step of the real engine is followed by a look at the live bar (tqdm keeps its
    # instances): its count and how many requests had finished by then.
    seen: list[tuple[float, float, int]] = []  # (bar count, bar total, requests finished)
    finished: set[str] = set()
    real_step = Engine.step

    def step_and_look(engine: Engine):  # type: ignore[no-untyped-def]
        outputs = real_step(engine)
        finished.update(o.request_id for o in outputs if o.finished)
        bars = [bar for bar in list(tqdm._instances) if bar.desc == "generate"]
        seen.append((bars[0].n, bars[0].total, len(finished)) if bars else (-1, -1, len(finished)))
        return outputs

    monkeypatch.setattr(Engine, "step", step_and_look)
    requests = [GenerationRequest("Once upon a time", None, 6), GenerationRequest("The capital of France is", None, 6)]
    results = generate_with_engine(model_dir, {}, requests, show_progress=True, threads=1)
    assert len(results) == 2
    # A look inside step k sees the bar as steps before k left it.
    moving = [count for count, _, done in seen[1:] if done == 0 and count > 0]
    assert moving, f"the bar did not move before a request finished: {seen}"
    assert all(total == 12 for _, total, _ in seen)  # the two requests' budgets, in tokens

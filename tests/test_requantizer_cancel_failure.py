"""A removed task's job fails on what the removal took away (its calibration copy, deleted once
the cancel is sent): an outside probe saw `ERROR job failed [... CalibrationDataError(...)]` and a
traceback in the server's log for an ordinary removal. The job now ends as cancelled; a failure
with no cancel is still reported, as before."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from test_state_dir_integrity import channel  # noqa: F401  (the fixture: a requantizer _Channel and its peer)


def _job(tmp_path: Path):  # type: ignore[no-untyped-def]
    from inlaid.protocol import RequantizeJob

    return RequantizeJob(job_id="code@v1", task="code", adapter_dir=str(tmp_path), calibration=str(tmp_path / "c"),
                         version=1, start_layer=0, model_dir="m", checkpoint_dir="q", served_layers={},
                         state_dir=str(tmp_path), layers_dir=str(tmp_path))


def _failing_quantizer(before_failing, error: Exception | None = None):  # type: ignore[no-untyped-def]
    from inlaid.quant.errors import CalibrationDataError

    class Quantizer:
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            pass

        def layers(self, start: int):  # type: ignore[no-untyped-def]
            before_failing()
            raise error or CalibrationDataError("calibration file /state/calibration/code.jsonl does not exist")
            yield  # pragma: no cover

    return Quantizer


def test_a_job_failing_after_its_cancel_was_sent_ends_as_cancelled(channel, monkeypatch, tmp_path,  # noqa: F811
                                                                    caplog):
    import inlaid.quant.incremental
    from inlaid.protocol import CancelJob
    from inlaid.serve.requantizer import _Stop, run_job

    requantizer, send, _ = channel
    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer",
                        _failing_quantizer(lambda: send(CancelJob(job_id="code@v1"))))
    with caplog.at_level(logging.INFO, logger="inlaid.requantizer"), pytest.raises(_Stop) as stopped:
        run_job(requantizer, _job(tmp_path))
    assert not stopped.value.shutdown
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_failure_without_a_cancel_is_still_reported(channel, monkeypatch, tmp_path, caplog):  # noqa: F811
    import inlaid.quant.incremental
    from inlaid.serve.requantizer import run_job

    requantizer, _, receive = channel
    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer", _failing_quantizer(lambda: None))
    with caplog.at_level(logging.INFO, logger="inlaid.requantizer"):
        run_job(requantizer, _job(tmp_path))
    finished = receive()
    assert (finished.job_id, finished.ok) == ("code@v1", False) and "does not exist" in finished.error
    (failed,) = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage() == "job failed"]
    # a failure the job names is one line: the probe's damaged state logged a traceback each time
    assert "CalibrationDataError" in failed.error and not hasattr(failed, "trace")


def test_an_unexpected_failure_is_logged_with_its_traceback(channel, monkeypatch, tmp_path, caplog):  # noqa: F811
    import inlaid.quant.incremental
    from inlaid.serve.requantizer import run_job

    requantizer, _, receive = channel
    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer",
                        _failing_quantizer(lambda: None, KeyError("trans-fr")))
    with caplog.at_level(logging.INFO, logger="inlaid.requantizer"):
        run_job(requantizer, _job(tmp_path))
    assert not receive().ok
    (failed,) = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage() == "job failed"]
    assert "Traceback" in failed.trace and "KeyError: 'trans-fr'" in failed.trace


def test_damaged_adapter_weights_are_named_in_the_jobs_reason(channel, monkeypatch, tmp_path, caplog):  # noqa: F811
    """An adapter file damaged after its task was added failed the job with safetensors' raw
    "SafetensorError: Error while deserializing header: ..." and a traceback (an outside probe):
    the reason now names the file and what to make of it, in one log line. The error is the
    real one safetensors raises on a damaged file, from inside the job's quantizer."""
    import inlaid.quant.incremental
    from inlaid.serve.requantizer import run_job

    damaged = tmp_path / "adapter_model.safetensors"
    damaged.write_bytes(b"\x10" * 1000)

    def open_damaged() -> None:
        from safetensors import safe_open

        safe_open(str(damaged), framework="pt")

    requantizer, _, receive = channel
    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer", _failing_quantizer(open_damaged))
    with caplog.at_level(logging.INFO, logger="inlaid.requantizer"):
        run_job(requantizer, _job(tmp_path))
    finished = receive()
    assert not finished.ok
    assert finished.error.startswith(f"the task's adapter weights ({damaged}) cannot be read, damaged or changed "
                                     "since the task was added (Error while deserializing header"), finished.error
    (failed,) = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage() == "job failed"]
    assert not hasattr(failed, "trace")
    # The same error from another file (a damaged Hessian state, a layer's file) with the adapter
    # intact: not blamed on the adapter (a review), its own text kept.
    import shutil

    intact = tmp_path / "intact"
    shutil.copytree(Path(__file__).resolve().parents[1] / "adapters" / "qa", intact)
    monkeypatch.setattr(inlaid.quant.incremental, "IncrementalQuantizer", _failing_quantizer(open_damaged))
    import msgspec

    run_job(requantizer, msgspec.structs.replace(_job(tmp_path), adapter_dir=str(intact)))
    other = receive()
    assert not other.ok and other.error.startswith("SafetensorError: Error while deserializing header"), other.error

"""An adapter load that fails by a fault of the engine (not of the adapter's files) logs its
traceback once and names the exception in each failed request: every request of the task
failed with "'int' object is not iterable" and no process logged where (an outside probe)."""

from __future__ import annotations

import logging

import pytest

from inlaid.engine import Engine, EngineConfig, SamplingParams
from inlaid.engine import runner as runner_module
from inlaid.protocol import ErrorCode


def test_an_engine_fault_in_an_adapter_load_is_logged_with_its_traceback_once(model_dir, adapter_dirs, monkeypatch,
                                                                             caplog) -> None:
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), dtype="float32", threads=1, max_num_seqs=4,
                                       num_kv_blocks=64, max_lora_slots=2, max_lora_rank=32, max_model_len=256))
    engine.register_adapter("attn", str(adapter_dirs["attn-r8"]))

    def faulty_install(*arguments, **options):  # type: ignore[no-untyped-def]
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(runner_module, "install_adapter", faulty_install)
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    with caplog.at_level(logging.ERROR, logger="inlaid.engine"):
        for _ in range(2):
            engine.add_request("Once upon a time", sampling=sampling, adapter="attn")
            result = engine.runner.execute(engine.begin_step())
            assert [(f.code, f.message) for f in result.failed] == [
                (ErrorCode.ADAPTER_FAILED, "adapter 'attn' could not be loaded: TypeError: 'int' object is not "
                                           "iterable")]
            engine.finish_step(result)
    logged = [record for record in caplog.records if record.getMessage() == "an adapter load failed in the engine"]
    assert len(logged) == 1 and logged[0].exc_info is not None and logged[0].exc_info[0] is TypeError
    assert "faulty_install" in caplog.text  # the traceback names where it was raised
    assert engine.generate(["Once upon a time"], sampling, [None])[0].error is None  # the base still serves


@pytest.fixture(autouse=True)
def _propagate_engine_logs():  # type: ignore[no-untyped-def]
    """The server's logging set-up stops propagation; caplog reads the root logger."""
    engine_log = logging.getLogger("inlaid")
    before = engine_log.propagate
    engine_log.propagate = True
    yield
    engine_log.propagate = before

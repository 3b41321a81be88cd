"""Start-up tuning of the inlaid policy (inlaid/scheduling/autotune.py): the choice rule on
hand-made scores, real simulations on a committed cost model (every candidate on every
workload, the choice consistent with the rule), the explicit options kept, the cache, the
config checks, the server's start-up path and the `inlaid tune-scheduler` command. The live
re-tuning on task changes: test_sched_retuning.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from inlaid.scheduling import autotune
from inlaid.scheduling.autotune import CandidateScore, choose, score_candidates, tune_inlaid_options, tuned_options
from inlaid.scheduling.cost_model import StepCostModel
from inlaid.scheduling.simulator import EngineShape
from inlaid.serve.config import ConfigError, config_from_dict

COST_MODEL = Path(__file__).parents[1] / "bench" / "results" / "sched_cost_model_xeon.json"
SMALL = {"defaults": {}, "beta 2": {"max_adapters_per_step": 2, "batch_rows_target": 0}}


def _score(label: str, jct: float, slo: int, ttft: int) -> CandidateScore:
    return CandidateScore(label, {}, jct, jct, jct, 0, slo, ttft, 1.0, 4)


def test_choice_keeps_the_defaults_wins_and_then_takes_the_lowest_jct() -> None:
    scores = [_score("defaults", 1.20, 3, 2), _score("fast but loses tail", 0.80, 3, 1),
              _score("fast, loses SLO", 0.85, 2, 4), _score("better", 0.97, 3, 2), _score("best eligible", 0.95, 4, 3)]
    assert choose(scores).label == "best eligible"
    assert choose(scores[:3]).label == "defaults"  # nothing eligible beats it
    assert choose([_score("defaults", 1.0, 3, 2), _score("same", 1.0, 3, 2)]).label == "defaults"  # ties: defaults


def test_scores_against_fifo_on_the_same_workload() -> None:
    runs = [{"label": "fifo", "w": 1, "mean_jct_s": 10.0, "slo": 0.2, "p99_ttft_s": 4.0, "max_wait_s": 9.0},
            {"label": "a", "w": 1, "mean_jct_s": 5.0, "slo": 0.4, "p99_ttft_s": 5.0, "max_wait_s": 3.0},
            {"label": "fifo", "w": 2, "mean_jct_s": 4.0, "slo": 0.6, "p99_ttft_s": 2.0, "max_wait_s": 2.0},
            {"label": "a", "w": 2, "mean_jct_s": 8.0, "slo": 0.5, "p99_ttft_s": 2.0, "max_wait_s": 6.0}]
    (score,) = score_candidates(runs, {"a": {"x": 1}}, key=lambda r: r["w"])
    assert score.jct_geomean == pytest.approx(1.0) and (score.jct_best, score.jct_worst) == (0.5, 2.0)
    assert (score.jct_at_most_fifo, score.slo_2x_or_out_of_reach, score.p99_ttft_at_most_fifo) == (1, 2, 1)
    assert score.max_wait_s == 6.0 and score.options == {"x": 1}
    with pytest.raises(ValueError, match="no runs"):
        score_candidates(runs, {"b": {}}, key=lambda r: r["w"])


def test_tuning_simulates_every_candidate_on_every_workload() -> None:
    cost = StepCostModel.load(COST_MODEL)
    workloads = ((1.0, "zipf"), (4.0, "uniform"))
    seen = []
    result = tune_inlaid_options(cost, EngineShape(max_lora_slots=4), 6, {"max_wait_s": 60.0}, requests=40,
                                 candidates=SMALL, workloads=workloads, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8, 8) and len(seen) == 8  # per workload: FIFO at saturation, FIFO, two candidates
    assert {(r["label"], r["cv"], r["popularity"]) for r in result.runs} == {
        (label, cv, popularity) for label in ("fifo", *SMALL) for cv, popularity in workloads}
    assert all(r["mean_jct_s"] > 0 and 0 <= r["slo"] <= 1 for r in result.runs)
    assert [s.label for s in result.scores] == list(SMALL) and all(s.workloads == 2 for s in result.scores)
    assert result.chosen is choose(result.scores)
    assert "(chosen)" in result.table()
    with pytest.raises(ValueError, match="defaults"):
        tune_inlaid_options(cost, EngineShape(), 3, requests=40, candidates={"beta 2": {}}, workloads=workloads)


def test_tuned_options_keep_explicit_ones_and_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "CANDIDATES", {"defaults": {}, "beta 2": {"max_adapters_per_step": 2}})
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    messages: list[str] = []
    explicit = {"max_adapters_per_step": 3, "max_wait_s": 50.0}
    options, result = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 5, explicit, cache_dir=str(tmp_path),
                                    requests=40, log=messages.append)
    assert result is not None and options == {**result.chosen.options, **explicit}
    assert options["max_adapters_per_step"] == 3  # the config's value wins over every candidate's
    (cache,) = tmp_path.glob("scheduler-tuning-*.json")
    assert "chose" in messages[-1]
    again, cached = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 5, explicit, cache_dir=str(tmp_path),
                                  requests=40, log=messages.append)
    assert cached is None and again == options and "read from" in messages[-1]
    _, other = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 6, explicit, cache_dir=str(tmp_path),
                             requests=40)
    assert other is not None  # another task count: simulated again
    # A cut or foreign cache file (a kill mid-write): named, tuned again and replaced, not an
    # error at every start with the server untuned for good.
    for damaged in ('{"chosen": ', '{"chosen": "x", "options": [1]}', "[]"):
        cache.write_text(damaged)
        retuned, fresh = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 5, explicit,
                                       cache_dir=str(tmp_path), requests=40, log=messages.append)
        assert fresh is not None and retuned == options, damaged
        assert any(f"{cache} is unreadable" in message for message in messages[-3:]), messages[-3:]
        assert json.loads(cache.read_text())["options"] == result.chosen.options  # replaced whole
    # A cache that cannot be written (a read-only state_dir): the tuning stands, said, not lost
    (tmp_path / "a-file").write_text("")
    kept, tuned = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 5, explicit,
                                cache_dir=str(tmp_path / "a-file" / "cache"), requests=40, log=messages.append)
    assert tuned is not None and kept == options and "not written" in messages[-1]


def test_the_server_gets_the_prefill_weight_its_tuning_simulated(tmp_path: Path) -> None:
    """Every simulated variant prices a prompt token at the cost model's step-time ratio (or,
    for the resource-cost candidate, its per-row ratio); the chosen options carry that
    number, so the policy the server builds from them is the one that was simulated (before,
    the server fell back to the option's default, 0.006, whatever the cost model)."""
    from inlaid.scheduling.cost_model import ChunkShape, StepFeatures
    from inlaid.scheduling.registry import parse_options

    cost, shape = StepCostModel.load(COST_MODEL), EngineShape(max_lora_slots=4)
    half_batch = [ChunkShape(1, 200, index % 4, 16, True) for index in range(shape.max_num_seqs // 2)]
    per_token = cost.coefficients["tokens"]
    step = cost.step_seconds(StepFeatures.of_chunks(half_batch, 0, shape.block_size))
    candidates = {"defaults": {}, "resource": {"prefill_weight": autotune.RESOURCE_COST},
                  "mine": {"prefill_weight": 2.0}}
    result = tune_inlaid_options(cost, shape, 6, requests=40, candidates=candidates, workloads=((4.0, "zipf"),))
    weights = {score.label: score.options["prefill_weight"] for score in result.scores}
    assert weights["defaults"] == pytest.approx(per_token / step, rel=1e-3)
    assert weights["resource"] == pytest.approx(per_token / (step / len(half_batch)), rel=1e-3)
    assert weights["mine"] == 2.0 and per_token / step != pytest.approx(0.006, rel=0.1)
    assert parse_options("inlaid", result.chosen.options).prefill_weight == weights[result.chosen.label]
    runs = {r["label"]: r for r in result.runs}
    assert runs["resource"]["mean_jct_s"] != runs["defaults"]["mean_jct_s"]  # the weight reached the policy
    explicit = tune_inlaid_options(cost, shape, 6, {"prefill_weight": 0.5}, requests=40, candidates=candidates,
                                   workloads=((4.0, "zipf"),))
    jct = {r["label"]: r["mean_jct_s"] for r in explicit.runs if r["label"] != "fifo"}
    assert len(set(jct.values())) == 1  # the config's weight wins over every candidate's


def _lengths_file(path: Path, change: dict | None = None, drop_split: str | None = None) -> Path:
    """The fp32 suite lengths, each record with `change` applied, `drop_split`'s left out."""
    from inlaid.scheduling.suite import SUITE_LENGTHS_FILE

    records = [json.loads(line) for line in SUITE_LENGTHS_FILE.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, **(change or {})}) + "\n" for r in records if r["split"] != drop_split))
    return path


def test_the_tuning_simulates_the_recorded_lengths_it_is_given(tmp_path: Path) -> None:
    """One-token answers instead of the suite's: the same seeds, the same arrivals' shape, and
    every workload's requests finish far sooner; FIFO at saturation serves far more per second."""
    cost = StepCostModel.load(COST_MODEL)
    workloads = ((1.0, "zipf"),)
    short = _lengths_file(tmp_path / "short.jsonl", {"output_tokens": 1})

    def fifo_run(lengths: Path | None) -> dict:
        result = tune_inlaid_options(cost, EngineShape(max_lora_slots=4), 6, requests=60, candidates={"defaults": {}},
                                     workloads=workloads, lengths_file=lengths)
        return next(r for r in result.runs if r["label"] == "fifo")

    suite, one_token = fifo_run(None), fifo_run(short)
    assert one_token["mean_jct_s"] < 0.5 * suite["mean_jct_s"]
    assert one_token["throughput_rps"] > 2 * suite["throughput_rps"]
    with pytest.raises(ValueError, match="both splits"):
        tune_inlaid_options(cost, EngineShape(), 3, requests=40, candidates={"defaults": {}}, workloads=workloads,
                            lengths_file=_lengths_file(tmp_path / "no_calib.jsonl", drop_split="calib"))


def test_tuned_options_are_cached_per_lengths_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "CANDIDATES", {"defaults": {}})
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    messages: list[str] = []
    short = _lengths_file(tmp_path / "short.jsonl", {"output_tokens": 1})
    for lengths, simulated in ((None, True), (short, True), (None, False), (short, False)):
        _, result = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 5, cache_dir=str(tmp_path / "cache"),
                                  requests=40, log=messages.append, lengths_file=lengths)
        assert (result is not None) == simulated
    assert len(list((tmp_path / "cache").glob("scheduler-tuning-*.json"))) == 2
    assert any("lengths from short.jsonl" in message for message in messages)


def test_config_chooses_the_lengths_of_the_base_it_serves(tmp_path: Path) -> None:
    from inlaid.scheduling.suite import SUITE_LENGTHS_4BIT_FILE, SUITE_LENGTHS_FILE

    (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
    scheduler = {"autotune_cost_model": "cost.json"}

    def config(model: dict | None = None, **extra: object):  # type: ignore[no-untyped-def]
        return config_from_dict({"server": {"policy": "inlaid"}, "model": model or {},
                                 "scheduler": {**scheduler, **extra}}, base_dir=tmp_path)

    assert config().tuning_lengths_file() == str(SUITE_LENGTHS_FILE)
    assert config({"quantized_dir": "ckpt"}).tuning_lengths_file() == str(SUITE_LENGTHS_4BIT_FILE)
    mine = _lengths_file(tmp_path / "mine.jsonl")
    assert config({"quantized_dir": "ckpt"}, autotune_lengths="mine.jsonl").tuning_lengths_file() == str(mine)
    bad_records = {"missing.jsonl": "is missing", "no_eval.jsonl": "both splits", "zero.jsonl": "positive integer",
                   "junk.jsonl": "not a recorded request", "over.jsonl": "exceeds max_tokens"}
    _lengths_file(tmp_path / "no_eval.jsonl", drop_split="eval")
    _lengths_file(tmp_path / "zero.jsonl", {"prompt_tokens": 0})
    _lengths_file(tmp_path / "over.jsonl", {"output_tokens": 10_000})
    (tmp_path / "junk.jsonl").write_text(mine.read_text() + "{not json\n")
    for name, message in bad_records.items():
        with pytest.raises(ConfigError, match=message):
            config(autotune_lengths=name)
    with pytest.raises(ConfigError, match="needs scheduler.autotune_cost_model"):
        config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"autotune_lengths": "mine.jsonl"}},
                         base_dir=tmp_path)


def test_config_checks_the_cost_model_and_the_policy(tmp_path: Path) -> None:
    (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
    config = config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"autotune_cost_model": "cost.json",
                                                                             "max_wait_s": 30.0}}, base_dir=tmp_path)
    assert config.autotune_cost_model == str(tmp_path / "cost.json") and config.scheduler == {"max_wait_s": 30.0}
    with pytest.raises(ConfigError, match="tunes the inlaid policy"):
        config_from_dict({"server": {"policy": "fifo"}, "scheduler": {"autotune_cost_model": "cost.json"}},
                         base_dir=tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"coefficients": {"no such feature": 1.0}}))
    for name, words in (("bad.json", "not a cost model"), ("missing.json", "cost model file not found")):
        with pytest.raises(ConfigError, match=words):
            config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"autotune_cost_model": name}},
                             base_dir=tmp_path)
    (tmp_path / "negative.json").write_text(json.dumps({"coefficients": {"constant": -1.0}}))
    with pytest.raises(ConfigError, match="not a usable cost model"):
        config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"autotune_cost_model": "negative.json"}},
                         base_dir=tmp_path)
    with pytest.raises(ConfigError, match="non-empty path"):
        config_from_dict({"server": {"policy": "inlaid"}, "scheduler": {"autotune_cost_model": 3}}, base_dir=tmp_path)


def test_server_start_builds_its_policy_with_the_tuned_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from inlaid.serve.cli import _tuned_policies

    monkeypatch.setattr(autotune, "CANDIDATES", {"defaults": {}, "beta 2": {"max_adapters_per_step": 2,
                                                                           "batch_rows_target": 0}})
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    config = config_from_dict({"server": {"policy": "inlaid", "state_dir": "state"}, "executor": {"max_lora_slots": 4},
                               "tasks": {f"t{i}": "adapter" for i in range(5)},
                               "scheduler": {"autotune_cost_model": str(COST_MODEL), "max_wait_s": 40.0,
                                             "step_log": "steps.jsonl"}},
                              base_dir=tmp_path)
    # the executor's limits, else defaults (the CPU's cap on prompt tokens beside decodes among them)
    assert EngineShape.of(config.engine) == EngineShape(max_lora_slots=4, max_prefill_tokens_beside_decodes=512)
    with caplog.at_level(logging.INFO, logger="inlaid.coordinator"):
        policy = _tuned_policies(config)()
    assert "scheduler tuning chose" in caplog.text and "4 adapter slots" in caplog.text
    assert not (tmp_path / "steps.jsonl").exists()  # the simulations do not write the server's step log
    chosen = json.loads(next((tmp_path / "state").glob("scheduler-tuning-*.json")).read_text())
    expected = {**autotune.CANDIDATES[chosen["chosen"]], "max_wait_s": 40.0, "step_log": str(tmp_path / "steps.jsonl")}
    assert config.scheduler == {"max_wait_s": 40.0, "step_log": str(tmp_path / "steps.jsonl")}  # the config as written
    policy.close()
    options = policy.inner.options  # the server's step log wraps the policy
    assert options.max_wait_s == 40.0
    assert options.max_adapters_per_step == expected.get("max_adapters_per_step", 8)


def test_a_failed_tuning_starts_the_server_with_the_configured_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    from inlaid.serve.cli import _tuned_policies

    monkeypatch.setattr(autotune, "CANDIDATES", SMALL)
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))

    (tmp_path / "cost.json").write_text(COST_MODEL.read_text())
    config = config_from_dict({"server": {"policy": "inlaid", "state_dir": "state"},
                               "scheduler": {"autotune_cost_model": "cost.json", "max_wait_s": 40.0}}, base_dir=tmp_path)
    # A cache that cannot be written costs only the next start's shortcut: the tuning stands
    (tmp_path / "state").write_text("a file where the cache directory should be")
    with caplog.at_level(logging.INFO, logger="inlaid.coordinator"):
        policy = _tuned_policies(config)()
    assert "not written" in caplog.text and "scheduler tuning failed" not in caplog.text
    assert policy.options.max_wait_s == 40.0  # the configured option over the tuning's
    # A tuning that fails (the cost model gone since the config was read): the configured options
    (tmp_path / "cost.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inlaid.coordinator"):
        policy = _tuned_policies(config)()
    assert "scheduler tuning failed" in caplog.text and config.scheduler == {"max_wait_s": 40.0}
    assert policy.options.max_wait_s == 40.0 and policy.options.max_adapters_per_step == 8


def test_the_coordinator_serves_with_the_tuned_policies_from_before_the_first_request(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tuning runs while the executors load; before the front reads a request, every
    engine's policy is replaced by the tuning's (the configured one closed); a failed tuning
    keeps the configured policies; a policy cannot be replaced once requests are queued."""
    import asyncio

    from inlaid.engine.sequence import Sequence
    from inlaid.protocol import SamplingParams
    from inlaid.serve.cli import _policies
    from inlaid.serve.coordinator import Coordinator

    config = config_from_dict({"model": {"dir": str(model_dir)}, "server": {"policy": "inlaid"},
                               "executors": {"count": 2}, "scheduler": {"max_wait_s": 40.0}}, base_dir=tmp_path)

    def run(tune) -> Coordinator:  # type: ignore[no-untyped-def]
        coordinator = Coordinator(config, policy_factory=_policies(config), tune_policies=tune)

        async def take() -> None:
            await coordinator._take_tuned_policies(asyncio.get_running_loop().run_in_executor(None, tune))

        asyncio.run(take())
        return coordinator

    tuned = run(lambda: _policies(config, {"max_wait_s": 40.0, "max_adapters_per_step": 2}))
    policies = [engine.scheduler.policy for engine in tuned.pool.engines]
    assert len(policies) == 2 and policies[0] is not policies[1]
    assert all(p.options.max_adapters_per_step == 2 and p.options.max_wait_s == 40.0 for p in policies)
    assert policies[0].length_model is policies[1].length_model  # shared, as the configured ones were

    def failing():  # type: ignore[no-untyped-def]
        raise RuntimeError("no cost model today")

    with caplog.at_level(logging.ERROR, logger="inlaid.coordinator"):
        kept = run(failing)
    assert [r.error for r in caplog.records if "scheduler tuning failed" in r.message] == [
        "RuntimeError: no cost model today"]
    assert all(engine.scheduler.policy.options.max_adapters_per_step == 8 for engine in kept.pool.engines)

    scheduler = kept.pool.engines[0].scheduler
    scheduler.add(Sequence(seq_id=0, prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=2)))
    with pytest.raises(RuntimeError, match="before any request"):
        scheduler.replace_policy(policies[0])


def test_command_prints_the_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from inlaid.cli import main

    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    out = tmp_path / "tuning.json"
    assert main(["tune-scheduler", "--cost-model", str(COST_MODEL), "--tasks", "4", "--slots", "4", "--requests", "30",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "| defaults" in printed
    saved = json.loads(out.read_text())
    assert saved["chosen"] in autotune.CANDIDATES and len(saved["scores"]) == len(autotune.CANDIDATES)
    # Where even the chosen set loses to FIFO, the command says so (it only named the choice)
    chosen = next(score for score in saved["scores"] if score["label"] == saved["chosen"])
    assert ("may serve better" in printed) == (chosen["jct_geomean"] > 1.0), (chosen, printed[-600:])
    (tmp_path / "bad.json").write_text("{}")
    assert main(["tune-scheduler", "--cost-model", str(tmp_path / "bad.json")]) == 2
    capsys.readouterr()
    assert main(["tune-scheduler", "--cost-model", str(tmp_path / "gone.json")]) == 2
    assert "cost model file not found" in capsys.readouterr().err  # not "is not a cost model ...: [Errno 2]"
    assert main(["tune-scheduler", "--cost-model", str(COST_MODEL), "--requests", "30",
                 "--lengths", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl is missing" in capsys.readouterr().err


def test_command_reads_a_servers_config_without_its_admin_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture, model_dir) -> None:
    """The tuning makes no admin call: a config naming an unset admin_token_env (as the
    documented one does) is no refusal ("environment variable ... is empty", exit 2)."""
    from inlaid.cli import main

    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    monkeypatch.delenv("INLAID_TEST_UNSET_TOKEN", raising=False)
    config = tmp_path / "server.toml"
    config.write_text(f'[model]\ndir = "{model_dir}"\n[server]\npolicy = "inlaid"\n'
                      'admin_token_env = "INLAID_TEST_UNSET_TOKEN"\n[executor]\nmax_lora_slots = 4\n')
    assert main(["tune-scheduler", "--cost-model", str(COST_MODEL), "--config", str(config), "--tasks", "4",
                 "--requests", "30"]) == 0, capsys.readouterr().err
    assert "chosen:" in capsys.readouterr().out


def test_the_tuning_leaves_the_servers_predictor_learning_out_of_its_simulations(monkeypatch, tmp_path) -> None:
    """predictor_refit_every and predictor_state are the server's learning: a simulation
    refits inline, so `predictor_refit_every = 4` made every run refit every 4 finished
    requests (the tuning took over 150 s instead of 15 s); and no simulation may touch the
    server's state file. The tuned options still carry them for the server."""
    from inlaid.scheduling import experiment

    refits: list[int] = []
    original = experiment.length_model

    def recording(kind, history, refit_every=0):  # noqa: ANN001, ANN202
        refits.append(refit_every)
        return original(kind, history, refit_every)

    monkeypatch.setattr(experiment, "length_model", recording)
    state = tmp_path / "predictor.npz"
    explicit = {"predictor_refit_every": 4, "predictor_state": str(state)}
    cost = StepCostModel.load(COST_MODEL)
    result = tune_inlaid_options(cost, EngineShape(max_lora_slots=4), 6, explicit, requests=40,
                                 candidates=SMALL, workloads=((4.0, "zipf"),))
    assert refits and set(refits) == {0}, refits  # the simulator's default: no inline refits
    assert all("predictor_refit_every" not in s.options for s in result.scores)
    assert not state.exists()
    monkeypatch.setattr(autotune, "CANDIDATES", SMALL)
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    options, _ = tuned_options(str(COST_MODEL), EngineShape(max_lora_slots=4), 6, explicit, requests=40)
    assert options["predictor_refit_every"] == 4 and options["predictor_state"] == str(state)


def test_tuning_simulates_the_executors_devices_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[executor] device = "cpu"` beside CUDA `[executors] devices`: the tuning simulated the
    CPU's cap on prompt tokens beside decodes, which no executor applied (a review)."""
    from inlaid.serve.cli import tuned_options_for

    monkeypatch.setattr(autotune, "CANDIDATES", {"defaults": {}})
    monkeypatch.setattr(autotune, "WORKLOADS", ((4.0, "zipf"),))
    seen: list[EngineShape] = []
    real = autotune.tuned_options

    def recording(cost_model, shape, *args, **kwargs):  # the real tuning, its shape kept
        seen.append(shape)
        return real(cost_model, shape, *args, **kwargs)

    monkeypatch.setattr(autotune, "tuned_options", recording)
    for devices, cap in ((["cuda:0", "cuda:1"], None), (["cpu", "cpu"], 512), (["cpu", "cuda:0"], None)):
        config = config_from_dict({"server": {"policy": "inlaid", "state_dir": "state"},
                                   "executor": {"device": "cpu", "max_lora_slots": 4},
                                   "executors": {"count": 2, "devices": devices}, "tasks": {"t0": "adapter"},
                                   "scheduler": {"autotune_cost_model": str(COST_MODEL)}}, base_dir=tmp_path)
        assert config.planning_engine().device == ("cpu" if cap else next(d for d in devices if d != "cpu"))
        tuned_options_for(config, 1)
        assert seen[-1] == EngineShape(max_lora_slots=4, max_prefill_tokens_beside_decodes=cap)

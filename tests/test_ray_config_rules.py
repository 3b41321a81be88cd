"""Ray Serve deploy fixes (outside probe, 2026-12-07): a route_prefix Ray refuses passed the
config check and failed the deploy with Ray's traceback; a `task` among the handle's arguments
was refused in bind()'s words; a deployed command blocked forever once its application was
deleted or Serve shut down by someone else, and its Ctrl-C then ended in a traceback."""

from __future__ import annotations

import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from inlaid.serve.config import ConfigError

with warnings.catch_warnings():  # Ray 2.60 declares pydantic fields in a deprecated style; not ours
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray.serve._private.utils import validate_route_prefix

    from inlaid.integrations.ray import ReplicaBase
    from inlaid.integrations.ray_config import ray_config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _raw(model_dir: Path, **ray: Any) -> dict[str, Any]:
    return {"ray": {"num_replicas": 1, **ray}, "model": {"dir": str(model_dir)},
            "executor": {"threads": 1, "max_lora_rank": 16}, "tasks": {"qa": str(ADAPTERS / "qa")}}


@pytest.mark.parametrize("prefix", ["/", "/x", "/x/y", "/x/", "x", "/{name}", "/a}", "//", "/x//y"])
def test_a_route_prefix_is_accepted_exactly_when_ray_accepts_it(model_dir: Path, prefix: str) -> None:
    try:
        validate_route_prefix(prefix)  # Ray Serve's own check, which the deploy runs after connecting
        ray_accepts = True
    except ValueError:
        ray_accepts = False
    try:
        ray_config_from_dict(_raw(model_dir, route_prefix=prefix))
        accepted = True
    except ConfigError as error:
        accepted = False
        assert str(error).startswith("ray.route_prefix must start with '/'") and "\n" not in str(error)
    assert accepted == ray_accepts


def test_a_task_among_the_handles_arguments_names_multiplexed_model_id() -> None:
    from inlaid.client import InvalidRequestError

    async def generate(task: str | None = None, prompt: str = "", max_tokens: int = 16) -> None:
        pass  # the SDK call's shape: the task is its keyword, the replica fills it in

    with pytest.raises(InvalidRequestError, match=r"the task is not an argument: it is the handle's "
                                                  r"multiplexed_model_id"):
        ReplicaBase._arguments(generate, {"prompt": "hi", "task": "qa"})
    assert ReplicaBase._arguments(generate, {"prompt": "hi"}) == {"prompt": "hi"}


class _Serve:
    """serve.status() and serve.delete as the cluster answers them: `answers` in turn (an
    exception is raised; a set holds the application names deployed); the last one repeats."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def status(self) -> Any:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return types.SimpleNamespace(applications={name: object() for name in answer})


def test_the_deployed_command_ends_when_its_application_is_deleted_elsewhere() -> None:
    from inlaid.integrations.ray_deploy import wait_while_deployed

    serve = _Serve({"inlaid"}, {"inlaid", "other"}, {"other"})
    assert wait_while_deployed(serve, "inlaid", period_s=0) == ("application 'inlaid' was deleted on the "
                                                               "cluster, not by this command")
    assert serve.calls == 3


def test_the_deployed_command_ends_when_serve_stops_but_not_on_a_passing_failure() -> None:
    from inlaid.integrations.ray_deploy import wait_while_deployed

    gone = RuntimeError("There is no Serve instance running on this Ray cluster.")
    serve = _Serve({"inlaid"}, gone, gone, {"inlaid"}, gone, gone, gone)  # two failures, then back: kept
    assert wait_while_deployed(serve, "inlaid", period_s=0) == ("Ray Serve stopped on the cluster (RuntimeError: "
                                                               "There is no Serve instance running on this Ray "
                                                               "cluster.)")
    assert serve.calls == 7


def test_a_controller_slow_to_answer_is_waited_on_one_question_at_a_time(monkeypatch) -> None:
    """Ray's status call waits on the controller with no time limit: a stuck one held the watch
    in that call (a reviewer), and ending the command on a slow one left the application
    serving with no owner (another): the watch waits on the same question, asks no other
    meanwhile, and reads the answer when it comes."""
    import threading

    from inlaid.integrations import ray_deploy

    monkeypatch.setattr(ray_deploy, "_PROBE_TIMEOUT_S", 0.05)
    slow = threading.Event()

    class Slow:
        calls = 0

        def status(self) -> Any:
            Slow.calls += 1
            if Slow.calls == 1:
                slow.wait(60)
                return types.SimpleNamespace(applications={"inlaid": object()})
            return types.SimpleNamespace(applications={})

    said: list[str] = []
    watch = threading.Thread(target=lambda: said.append(ray_deploy.wait_while_deployed(Slow(), "inlaid", 0.01)))
    watch.start()
    time.sleep(0.5)  # ten periods
    assert watch.is_alive() and Slow.calls == 1 and said == []
    slow.set()
    watch.join(10)
    assert said == ["application 'inlaid' was deleted on the cluster, not by this command"] and Slow.calls == 2


def test_a_delete_serve_cannot_make_any_more_is_one_line(model_dir: Path, capsys) -> None:
    """Ctrl-C after Serve was shut down on the cluster: serve.delete raised Ray's ActorDiedError
    out of the command (an outside probe); now one line says it, and the exit is Ctrl-C's."""
    import signal

    from inlaid.integrations.ray_deploy import _serve

    def run(*arguments: Any, **options: Any) -> None:  # Ctrl-C while deployed
        raise KeyboardInterrupt

    def delete(name: str) -> None:
        raise RuntimeError("The actor died unexpectedly before finishing this task (SERVE_CONTROLLER_ACTOR)")

    serve = types.SimpleNamespace(start=lambda **options: None, run=run, delete=delete)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = _serve(ray_config_from_dict(_raw(model_dir)), serve, lambda config: None)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert code == 130
    assert capsys.readouterr().err.splitlines() == [
        "inlaid ray: interrupted; deleting application 'inlaid'",
        "inlaid ray: application 'inlaid' could not be deleted (Ray Serve stopped on the cluster?): RuntimeError: "
        "The actor died unexpectedly before finishing this task (SERVE_CONTROLLER_ACTOR)"]

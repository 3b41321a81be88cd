"""Ray Serve deploy inputs refused in one line before connecting, by Ray's own rules (outside
probe, 2026-12-07): a route_prefix Ray refuses passed the config check and failed the deploy
with Ray's traceback; a `task` among the handle's arguments was refused in bind()'s words."""

from __future__ import annotations

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

"""The Ray Serve application's pieces that need no Ray: options derived from the settings, the
health check's verdicts on a real engine, the `sonar-llm ray` flags (fast; the cluster tests
are in test_ray.py)."""

from __future__ import annotations

import pytest

from models.pipeline import SonarLLMPipeline
from server.api.state import AppState
from server.cli import build_parser
from server.engine import Engine, EngineConfig
from server.ray_app import (
    ScaleOptions,
    deployment_options,
    health_problem,
    scale_from_args,
    split_args,
)
from server.settings import Settings, settings_from_args


def test_serve_options_follow_the_settings() -> None:
    settings, scale = split_args(
        {"device": "cuda", "max_running": "8", "max_waiting": "24", "shutdown_grace": "12"}
    )
    options = deployment_options(settings, scale)
    assert options["max_ongoing_requests"] == 32
    assert options["graceful_shutdown_timeout_s"] == 12
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["num_replicas"] == 1
    cpu, _ = split_args({"device": "cpu"})
    assert deployment_options(cpu, scale)["ray_actor_options"]["num_gpus"] == 0


def test_autoscaling_targets_the_running_batch_by_default() -> None:
    settings, scale = split_args({"device": "cpu", "max_running": "6", "max_replicas": "3"})
    auto = deployment_options(settings, scale)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 3)
    assert auto["target_ongoing_requests"] == 6
    assert "num_replicas" not in deployment_options(settings, scale)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"replicas": "2", "max_replicas": "3"}, "either replicas"),
        ({"min_replicas": "4", "max_replicas": "2"}, "exceeds"),
        ({"max_runing": "3"}, "unknown argument"),
        ({"max_running": "0"}, "greater than or equal"),
    ],
)
def test_bad_builder_args_are_refused(args: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_args(args)


def test_ray_command_parses_serve_and_replica_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "ray",
            "--max-running",
            "4",
            "--api-key",
            "k1",
            "--no-warmup",
            "--min-replicas",
            "1",
            "--max-replicas",
            "2",
            "--address",
            "auto",
        ]
    )
    settings = settings_from_args(args)
    assert (settings.max_running, settings.api_key, settings.warmup) == (4, ["k1"], False)
    assert scale_from_args(args) == ScaleOptions(min_replicas=1, max_replicas=2)
    assert args.address == "auto"


def test_ray_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ray", "--help"])
    text = capsys.readouterr().out
    for name in [*Settings.model_fields, *ScaleOptions.model_fields]:
        assert "--" + name.replace("_", "-") in text, name


def test_health_check_restarts_only_a_broken_replica(pipe: SonarLLMPipeline) -> None:
    state = AppState(Settings())
    assert health_problem(state) is None  # loading is not a fault
    engine = Engine(pipe, EngineConfig(max_running=1, max_waiting=1, cache_memory=1 << 26))
    engine.start()
    state.engine, state.status = engine, "ok"
    assert health_problem(state) is None
    engine.stop()  # the loop is gone
    assert health_problem(state) is not None and "engine loop died" in str(health_problem(state))
    state.status = "draining"
    assert health_problem(state) is None  # stopping on purpose
    state.status, state.detail = "failed", "no such checkpoint"
    assert "no such checkpoint" in str(health_problem(state))


def test_only_a_replica_names_itself() -> None:
    """Outside Ray no X-Replica-Id; a replica's app puts it on every answer and in /metrics."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.ray_app import replica_app

    plain = TestClient(create_app(Settings()))
    assert "x-replica-id" not in plain.get("/health/live").headers
    assert "target_info" not in plain.get("/metrics").text
    replica = TestClient(replica_app(Settings(), "abc123", export_metrics=False))
    for path in ("/health/live", "/health/ready", "/metrics", "/no/such/route"):
        assert replica.get(path).headers["x-replica-id"] == "abc123", path
    assert 'target_info{replica="abc123"} 1.0' in replica.get("/metrics").text

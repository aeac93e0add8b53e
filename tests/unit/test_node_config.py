"""A node's shutdown settings: what NodeConfig and `pdserve <role>` refuse."""

from __future__ import annotations

import pytest

from pdserve.cli import main
from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.models.loader import default_model_dir
from pdserve.node.server import NodeConfig


def _config(**fields: float) -> NodeConfig:
    return NodeConfig(role="mixed", node_id="n", model_dir=str(default_model_dir()),
                      engine=EngineConfig(cache=CacheConfig(8)), insecure=True, **fields)


def test_the_shutdown_bounds_default_to_a_30_s_drain_then_a_30_s_stop() -> None:
    config = _config()
    assert (config.drain_timeout_s, config.stop_timeout_s) == (30.0, 30.0)
    assert _config(drain_timeout_s=0, stop_timeout_s=0.5).stop_timeout_s == 0.5


@pytest.mark.parametrize(("field", "value"), [("stop_timeout_s", 0), ("stop_timeout_s", -1),
                                              ("drain_timeout_s", -1)])
def test_a_bound_out_of_range_is_refused_naming_it(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})


def test_the_cli_refuses_a_zero_stop_timeout_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mixed", "--insecure", "--stop-timeout", "0"]) == 2
    assert "stop_timeout_s must be > 0" in capsys.readouterr().err

"""The strategy contract is a Protocol (``topro.strategy.Strategy``) that every strategy meets, without a chain."""
from __future__ import annotations

import pytest

from topro.config import TrainConfig
from topro.strategy import Strategy
from topro.train import LocalStrategy


def protocol_members() -> set[str]:
    return {name for name in vars(Strategy) if not name.startswith("_")} | set(Strategy.__annotations__)


def missing(cls: type) -> set[str]:
    """Members of the protocol ``cls`` lacks (``device`` is set by ``__init__``)."""
    return {name for name in protocol_members() - {"device"} if not hasattr(cls, name)}


def test_the_local_strategy_meets_the_protocol():
    assert len(protocol_members()) >= 17 and not missing(LocalStrategy)
    local = LocalStrategy(TrainConfig())
    assert (local.rank, local.world_size, str(local.device), local.is_main) == (0, 1, "cpu", True)
    assert "wrap" in missing(object)  # the check can fail


def test_the_ray_strategies_meet_it_with_ray_beside_the_local_steps_not_under_them():
    pytest.importorskip("ray")
    from topro.cluster.strategies import DDPStrategy, DeepSpeedStrategy, RayWorker

    for cls in (DDPStrategy, DeepSpeedStrategy):
        assert not missing(cls), cls.__name__
        assert cls.__bases__ == (RayWorker, LocalStrategy)
    assert RayWorker.__bases__ == (object,) and LocalStrategy.__bases__ == (object,)

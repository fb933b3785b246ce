"""Train strategy options that run without a process group: the 8-bit optimizer and the option checks."""

from __future__ import annotations

import pytest
import torch


def test_adamw8bit_keeps_8bit_moments_and_trains_the_tiny_model(one_thread):
    pytest.importorskip("bitsandbytes", reason="train.optimizer=adamw8bit needs bitsandbytes")
    from pipelines.train_strategy import make_optimizer
    from rigface.model import ModelConfig, build_rigface, training_step

    c = build_rigface(ModelConfig(preset="tiny", resolution=64, expression_dim=8))
    params = c.model.trainable_parameters()
    opt = make_optimizer(params, name="adamw8bit", lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for k in ("source", "target", "render", "background")}
    batch["expression"] = torch.randn(2, 8, generator=g)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        training_step(c, batch, generator=torch.Generator().manual_seed(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    big = max(params, key=lambda p: p.numel())
    state = opt.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # the weights moved


@pytest.mark.parametrize("strategy,optimizer,ema,match", [
    ("fsdp", "adamw", True, "ema_decay"),
    ("fsdp", "adamw8bit", False, "adamw8bit"),
    ("zero", "adamw", False, "unknown strategy"),
])
def test_unsupported_combinations_are_clear_errors(strategy, optimizer, ema, match):
    from pipelines.train_strategy import StrategyError, check_options

    with pytest.raises(StrategyError, match=match):
        check_options(strategy, optimizer, ema)
    check_options("ddp", optimizer if optimizer != "adamw8bit" else "adamw8bit", ema)  # ddp takes all of them


def test_config_accepts_the_strategy_and_optimizer_fields():
    from rigface.config import ConfigError, load_config

    cfg = load_config([], ["train.strategy=fsdp", "train.optimizer=adamw8bit"])
    assert (cfg.train.strategy, cfg.train.optimizer) == ("fsdp", "adamw8bit")
    with pytest.raises(ConfigError, match="train.strategy"):
        load_config([], ["train.strategy=zero3"])

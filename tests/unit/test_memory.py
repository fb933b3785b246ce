"""The CPU memory estimator: its activation measurement on meta tensors equals a real CPU step's, and the
per-rank estimate orders the configurations the way their memory math says."""

from __future__ import annotations

import torch


def test_meta_measurement_equals_real_tensors_on_the_tiny_model(one_thread):
    from rigface.model import ModelConfig, build_rigface
    from rigface.model import memory

    real = build_rigface(ModelConfig(preset="tiny", resolution=64, expression_dim=8))
    batch = memory._batch(2, 64, 8)
    with memory.flash_attention_saves():
        pass  # the context restores the real SDPA
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    real_full, real_region = memory.saved_activation_bytes(real, batch, gradient_checkpointing=False)
    real_kept, _ = memory.saved_activation_bytes(real, batch, gradient_checkpointing=True)
    params, acts = memory.measure("tiny", 64, 8, batch_size=2)
    assert (acts.full * 2, acts.checkpointed * 2, acts.largest_region * 2) == (real_full, real_kept, real_region)
    assert acts.checkpointed < acts.full / 3  # checkpointing keeps only block boundaries
    counts = real.model.parameter_counts()
    assert params.model == counts["total"] and params.trainable == real.model.parameter_counts(True)["total"]


def test_estimates_order_the_configurations():
    from rigface.model import memory

    params = memory.ParamCounts(model=1_719_148_168, trainable=1_716_693_124, unet_id=859_520_964,
                                largest_unit=258_330_880, vae=83_653_863)
    acts = memory.ActivationSizes(full=6 * 2**30, checkpointed=2**30 // 2, largest_region=2**28)
    est = lambda **kw: memory.estimate(params, acts, batch_size=4, **kw).total  # noqa: E731
    ddp = est(strategy="ddp", world=2, optimizer="adamw", gradient_checkpointing=True)
    assert ddp > 24 * memory.GIB  # the point: plain DDP with fp32 AdamW does not fit 24 GB
    assert est(strategy="ddp", world=2, optimizer="adamw8bit", gradient_checkpointing=True) < ddp
    fsdp2 = est(strategy="fsdp", world=2, optimizer="adamw", gradient_checkpointing=True)
    fsdp8 = est(strategy="fsdp", world=8, optimizer="adamw", gradient_checkpointing=True)
    assert fsdp8 < fsdp2 < ddp
    assert est(strategy="fsdp", world=2, optimizer="adamw", gradient_checkpointing=False) > fsdp2
    # The optimizer state alone: 8 bytes per trainable parameter in fp32 AdamW (~12.8 GiB for SD-1.5's two UNets)
    parts = memory.estimate(params, acts, strategy="ddp", world=2, optimizer="adamw", gradient_checkpointing=True,
                            batch_size=4).parts
    assert parts["optimizer"] == 8 * params.trainable
    assert "24 GB" in memory.format_table([memory.estimate(params, acts, strategy="fsdp", world=2, optimizer="adamw",
                                                            gradient_checkpointing=True, batch_size=4)])

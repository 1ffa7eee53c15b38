"""A model left in train mode is probed in eval mode (no dropout, no drop-path), and gets its
own mode back afterwards, also when the probe fails (issue 19 item 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probekit as pk


def _dropout_vit():
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0,
        drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3)


def _mad(pm, x) -> np.ndarray:
    return pk.probe(pm, x, ["mad"], batch_size=2).table.sort_values(["image", "layer", "head"])["value"].to_numpy()


def _modes(module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_a_model_in_train_mode_is_probed_in_eval_mode_and_keeps_its_mode():
    model = _dropout_vit()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm = pk.wrap(model)
    model.eval()
    want = _mad(pm, x)
    model.train()
    model.blocks[0].eval()  # a mixed mode (e.g. a frozen block) is given back as it was
    before = _modes(model)
    first, second = _mad(pm, x), _mad(pm, x)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, want)
    assert _modes(model) == before


def test_attention_and_hidden_states_run_in_eval_mode_too():
    model = _dropout_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm = pk.wrap(model)
    want = pm.attention(x)[2]
    want_hidden = pm.hidden_states(x)[2]
    model.train()
    torch.testing.assert_close(pm.attention(x)[2], want, rtol=0, atol=0)
    torch.testing.assert_close(pm.hidden_states(x)[2], want_hidden, rtol=0, atol=0)
    assert model.training and all(_modes(model))


def test_wrap_leaves_the_callers_mode_alone():
    model = _dropout_vit().train()
    pk.wrap(model)
    assert all(_modes(model))


def test_the_mode_comes_back_when_the_probe_fails():
    model = _dropout_vit().train()
    pm = pk.wrap(model)

    def fail(*_):
        raise RuntimeError("failed on purpose")

    model.blocks[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="on purpose"):
        _mad(pm, torch.randn(2, 3, 32, 32))
    assert all(_modes(model))

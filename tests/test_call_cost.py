"""What a small pk.probe call does besides the forward, made cheaper without changing what it returns
(issue 25; the figures: benchmarks/bench_call_cost.py).

The long table is built in its column types at once and Results no longer converts it (the
conversion's result is asserted equal); a model in eval mode throughout is not walked three times
(a leaf in train mode is still found and given back); a preprocessed tensor's batches are slices
of it, not a DataLoader's (the same values, a strided tensor included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probekit as pk
from probekit.results import _is_typed, _typed


def _converted(df: pd.DataFrame) -> pd.DataFrame:
    """What Results made of any table before issue 25: every column converted (the reference)."""
    df = df[["model", "image", "layer", "head", "metric", "value"]].reset_index(drop=True)
    for col, dt in {"model": "category", "image": "string", "layer": "int16", "head": "int16",
                    "metric": "category"}.items():
        df[col] = df[col].astype(str).astype(dt) if dt in ("category", "string") else df[col].astype(dt)
    df["value"] = df["value"].astype("float64")
    return df


def _tiny():
    torch.manual_seed(0)
    return pk.load("timm:vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                   patch_size=8, img_size=32)


def test_the_probe_table_is_already_what_the_conversion_makes():
    pm = _tiny()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    table = pk.probe(pm, x, metrics=["mad", "entropy", "prefix_mass"], batch_size=2).table
    assert _is_typed(table)
    plain = table.astype({"model": object, "image": object, "metric": object, "layer": "int64", "head": "int64"})
    assert not _is_typed(plain)
    pd.testing.assert_frame_equal(table, _converted(plain), check_exact=True, check_categorical=True)
    assert len(table) == 3 * 3 * 2 * 2 and list(table["metric"].cat.categories) == ["entropy", "mad", "prefix_mass"]


def _typed_frame() -> pd.DataFrame:
    return _converted(pd.DataFrame({"model": ["m"] * 4, "image": ["a", "a", "b", "b"], "layer": [0, 1, 0, 1],
                                    "head": [-1] * 4, "metric": ["mad", "x", "mad", "x"], "value": [1.0, 2, 3, 4]}))


@pytest.mark.parametrize("change", ["unused category", "unsorted categories", "missing category", "missing image",
                                    "index", "layer int64", "column order"])
def test_a_table_the_conversion_would_change_is_converted(change):
    df = _typed_frame()
    assert _is_typed(df)
    if change == "unused category":
        df["metric"] = df["metric"].cat.add_categories(["zzz"])
    elif change == "unsorted categories":
        df["metric"] = df["metric"].cat.reorder_categories(["x", "mad"])
    elif change == "missing category":
        df.loc[0, "metric"] = np.nan
    elif change == "missing image":
        df.loc[1, "image"] = pd.NA
    elif change == "index":
        df.index = [3, 2, 1, 0]
    elif change == "layer int64":
        df["layer"] = df["layer"].astype("int64")
    else:
        df = df[["image", "model", "layer", "head", "metric", "value"]]
    assert not _is_typed(df)
    pd.testing.assert_frame_equal(_typed(df), _converted(df), check_exact=True, check_categorical=True)


def test_a_leaf_module_in_train_mode_is_found_and_given_back():
    pm = _tiny()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pm.model.eval()
    want = pk.probe(pm, x, metrics=["mad"]).table["value"].to_numpy()
    leaf = pm.model.blocks[1].attn.attn_drop
    leaf.p = 0.5  # a dropout that would change the values if it ran in train mode
    leaf.train()
    got = pk.probe(pm, x, metrics=["mad"]).table["value"].to_numpy()
    np.testing.assert_array_equal(got, want)
    assert leaf.training and [m for m in pm.model.modules() if m.training] == [leaf]


def test_a_tensors_batches_are_its_slices_strided_or_not():
    pm = _tiny()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    strided = x.contiguous(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    want = pk.probe(pm, x, metrics=["mad"], batch_size=5).table
    for images, batch in ((x, 2), (strided, 2), (strided, 5)):  # 2, 2, 1 images; then all at once
        got = pk.probe(pm, images, metrics=["mad"], batch_size=batch).table
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6, atol=1e-5)
    assert list(want["image"].unique()) == [str(i) for i in range(5)]

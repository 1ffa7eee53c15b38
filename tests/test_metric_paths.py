"""The metric contract's paths (issue 21): every built-in metric passes every engine path, and the kit
names the path where a plugin's number goes wrong.

The plugins here are defined at module level: the Triton path runs them in a child process under
Triton's interpreter, which imports them by name.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import probekit as pk
from probekit.geometry import LayerGeometry, ModelGeometry
from probekit.metric import Block, Metric
from probekit.testing import check_metric
from probekit.testing.paths import _engine, _qkv
from probekit.tokens import TokenLayout

slow = pytest.mark.slow  # each runs the kit's paths, the Triton one in a child process under the interpreter


def _reason(records, check: str) -> str:
    rec = next(r for r in records if r.check == check)
    assert rec.status == "failed", f"{check} {rec.status}: {rec.reason}"
    return rec.reason


class WrongKernelTerm(Metric):
    """MAD in pixels, whose fast form reads the grid-step distance sums instead of the pixel ones."""

    name = "wrong_kernel_term"
    kernel_terms = frozenset({"dist", "patch_mass"})

    def row_values(self, block: Block) -> torch.Tensor | None:
        if block.terms is not None:
            return block.terms.dist_grid  # the mistake: grid steps, not pixels
        assert block.layout is not None and block.probs is not None
        n0 = block.layout.num_prefix
        d = block.layout.pixel_distances(block.probs.device)[block.rows.start - n0: block.rows.stop - n0]
        return torch.einsum("bhrn,rn->bhr", block.probs[..., n0:], d)


class RightKernelTerm(WrongKernelTerm):
    """The same metric with the right term: passes every path."""

    name = "right_kernel_term"

    def row_values(self, block: Block) -> torch.Tensor | None:
        if block.terms is not None:
            return block.terms.dist_px
        return super().row_values(block)


@slow
def test_a_wrong_kernel_term_fails_naming_the_kernel_paths():
    reason = _reason(check_metric(WrongKernelTerm(), on_fail=None), "check_engine_paths")
    assert "C row kernel" in reason and "Triton kernel" in reason
    # the probability paths agree with the plain path: only the kernels' paths are named
    assert "one query row per block" not in reason and "no row terms" not in reason
    assert all(r.status == "passed" for r in check_metric(RightKernelTerm(), on_fail=None))


def test_the_kernel_term_mistake_is_as_large_as_on_a_real_tap():
    # what the engine reports on q and k (the default path on CPU takes the C kernel's sums)
    case = _qkv(3, 13, 13, seed=11)
    lay = TokenLayout(num_prefix=1, grid=(3, 4), patch_size=(8, 8))
    wrong = _engine(WrongKernelTerm(), case, lay, tap="qkv", attention_pass="fused")
    right = _engine(RightKernelTerm(), case, lay, tap="qkv", attention_pass="fused")
    assert (wrong - right).abs().max() > 1.0  # pixels vs grid steps of 8 px: far off


def test_a_0_1_metric_is_refused_at_definition_with_what_to_write():
    with pytest.raises(TypeError, match=r"query_tokens = 'patches' \| 'cls' \| 'all'"):
        class OldCls(Metric):  # noqa: F841 - 0.1's way to ask for the CLS query
            name = "old_cls"

            def query_rows(self, layout):
                return slice(0, 1)
    with pytest.raises(TypeError, match=r"row_values\(self, block\)"):
        class OldRows(Metric):  # noqa: F841
            name = "old_rows"

            def row_values(self, probs, layout, rows):
                return probs.amax(-1)
    with pytest.raises(TypeError, match="not_applicable_checks"):
        class OldExpected(Metric):  # noqa: F841
            name = "old_expected"
            expected_failed_checks = {"check_merged_halves": "why"}


class AnchoredSpread(Metric):
    """The spread of a query's attention around the image centre; the query is chosen by an option
    named ``anchor`` (not ``queries``): the engine reads the declared ``query_tokens``, never the name."""

    name = "anchored_spread"
    requires = ()
    anchor: Literal["patches", "cls"] = "patches"
    query_tokens = property(lambda self: self.anchor)

    def row_values(self, block: Block) -> torch.Tensor | None:
        assert block.probs is not None
        if block.geometry is not None:
            geo = block.geometry
            centre = torch.tensor(geo.image_size, dtype=torch.float32) / 2
            d = (geo.key_pos.float() - centre).norm(dim=-1) * geo.key_mask("patch")  # [G, Tk]
            return torch.einsum("nhqk,nk->nhq", block.probs, d[block.groups])
        lay = block.layout
        assert lay is not None
        centre = torch.tensor([(lay.grid[0] - 1) / 2, (lay.grid[1] - 1) / 2])
        d = (lay.coords() - centre).norm(dim=-1) * lay.patch_size[0]
        return block.probs[..., lay.num_prefix:] @ d


class SelfNormalizedSpread(AnchoredSpread):
    """0.1's habit carried over: the grouped branch averages by itself, over the image's patch count."""

    name = "self_normalized_spread"

    def row_values(self, block: Block) -> torch.Tensor | None:
        v = super().row_values(block)
        if block.geometry is not None and v is not None:
            return v / max(int(block.geometry.key_mask("patch")[0].sum()), 1)
        return v


@slow
def test_cls_through_an_option_named_otherwise_is_right_on_every_path():
    m = AnchoredSpread(anchor="cls")
    assert all(r.status == "passed" for r in check_metric(m, on_fail=None))
    # a class-attention layer: the CLS row alone, its value the same as on a global layer (not 1/16 of it)
    lay = TokenLayout(num_prefix=1, grid=(4, 4), patch_size=(16, 16))
    geo = LayerGeometry.class_attention(lay)
    case = _qkv(2, 1, lay.num_tokens, seed=5)
    grouped = _engine(AnchoredSpread(anchor="cls"), case, lay, ModelGeometry(lay, {0: geo}, 1))
    probs = torch.softmax(case["q"] @ case["k"].transpose(-1, -2) * case["scale"] + case["bias"], -1)
    full = torch.full((2, 2, lay.num_tokens, lay.num_tokens), 1 / lay.num_tokens)
    full[:, :, 0] = probs[:, :, 0]
    torch.testing.assert_close(grouped, AnchoredSpread(anchor="cls").compute(full, lay), rtol=1e-5, atol=1e-4)


@slow
def test_a_grouped_branch_with_its_own_query_count_fails_naming_the_layer():
    reason = _reason(check_metric(SelfNormalizedSpread(anchor="cls"), on_fail=None), "check_grouped_paths")
    assert "class-attention layer" in reason and "global layer whose CLS row" in reason


@slow
@pytest.mark.parametrize("name", ["mad", "entropy", "distance_profile", "prefix_mass", "cls_map", "head_similarity"])
def test_every_builtin_row_metric_passes_every_path(name):
    m = pk.metrics.get(name)()
    checks = {r.check: r for r in check_metric(m, on_fail=None)}
    assert checks["check_engine_paths"].status == "passed", checks["check_engine_paths"].reason
    assert checks["check_grouped_paths"].status == "passed", checks["check_grouped_paths"].reason


@slow
@pytest.mark.parametrize("options", [{"renormalize": True}, {"queries": "cls"}, {"units": "fraction"}])
def test_mad_options_pass_every_path(options):
    m = pk.metrics.get("mad")(**options)
    bad = [r for r in check_metric(m, on_fail=None) if r.status != "passed"]
    assert not bad, [(r.check, r.reason) for r in bad]


#: the labels contract issue 23 added for representation probes (needs_labels, on_labels, check_labels,
#: whole_set): a capability beyond 0.2's attention and hidden metrics, counted apart so that nothing else grows
LABELS_CONTRACT = {"needs_labels", "on_labels", "check_labels", "whole_set"}


def test_metric_public_surface_shrank_by_a_third():
    names = {n for n in dir(Metric) if not n.startswith("_")}
    assert LABELS_CONTRACT <= names
    assert len(names - LABELS_CONTRACT) <= 30, sorted(names)  # 0.1 had 45

"""The report's opening: per metric, one sentence that answers "how do these models differ?",
computed from the group contrasts (or, with one group, from the per-layer means).

Why a module of its own: the sentence is the page's first claim, so its numbers are computed
here from the same rows as the contrast table and tested against them, never written by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = ["findings", "short", "MAX_PAIRS"]

MAX_PAIRS = 3  # sentences per metric; further group pairs are in the contrast table

# how a difference reads for a metric (lower, higher; the same two words where layers differ in sign):
# "{a} attends 32-67 px closer than {b}"; other metrics: "{a} has lower <display name> than {b} ..., by {r}"
_WORDS = {"mad": ("attends {r} closer than", "attends {r} farther than", "closer", "farther"),
          "entropy": ("attends more sharply ({r} lower entropy) than",
                      "attends more diffusely ({r} higher entropy) than", "more sharply", "more diffusely")}


def short(v: float) -> str:
    """A number as the sentences print it: whole numbers from 10 up, else 3 significant digits.

    >>> short(66.5), short(-1.0843), short(0.012345), short(float("nan"))
    ('67', '-1.08', '0.0123', 'nan')
    """
    if not math.isfinite(v):
        return "nan"
    if abs(v) >= 10:  # halves away from zero, as people round (Python's format rounds 66.5 to 66)
        return f"{math.copysign(math.floor(abs(v) + 0.5), v):.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def _range(values: Sequence[float], unit: str) -> str:
    lo, hi = min(values), max(values)
    u = f" {unit}" if unit else ""
    return f"{short(lo)}{u}" if short(lo) == short(hi) else f"{short(lo)}–{short(hi)}{u}"


def _layers(ls: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0–2, 5"``."""
    out, run = [], [ls[0]]
    for x in ls[1:]:
        if x == run[-1] + 1:
            run.append(x)
        else:
            out.append(run)
            run = [x]
    out.append(run)
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in out)


def _side(group: str, members: list[str]) -> str:
    """A group as a sentence names it: its one model, or the group and its model count."""
    return members[0] if len(members) == 1 else f"the {group} models ({len(members)})"




def _pair_sentence(metric: Mapping[str, Any], rows: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    unit = str(metric.get("unit") or "")
    u = f" {unit}" if unit else ""
    rows = rows[rows["diff"].map(lambda v: v is not None and math.isfinite(float(v)))].sort_values("layer")
    n = len(rows)
    if n == 0:
        return {"text": f"{a} and {b}: no layer has a finite difference to report.", "layers": 0}
    lower = rows[rows["diff"] < 0]
    higher = rows[rows["diff"] > 0]
    big = rows.loc[rows["diff"].abs().idxmax()]
    words = _WORDS.get(str(metric.get("name")))
    if len(lower) == n or len(higher) == n:
        side = lower if len(lower) == n else higher
        where = "at every layer" if n > 1 else f"at layer {int(rows['layer'].iloc[0])}"
        r, is_lower = _range(side["diff"].abs().tolist(), unit), len(lower) == n
        count = f" ({n} of {n})" if n > 1 else ""
        if words is not None:
            text = f"{a} {words[0 if is_lower else 1].format(r=r)} {b} {where}{count}"
        else:
            display = metric.get("display") or metric["label"]
            text = f"{a} has {'lower' if is_lower else 'higher'} {display} than {b} {where}{count}, by {r}"
    elif len(lower) or len(higher):
        def part(side: pd.DataFrame, is_lower: bool) -> str:
            dirn = (words[2] if is_lower else words[3]) if words else ("lower" if is_lower else "higher")
            return (f"{dirn} at {len(side)} of {n} layers ({_layers([int(x) for x in side['layer']])}; by "
                    f"{_range(side['diff'].abs().tolist(), unit)})")

        verb = "attends" if words else f"has {metric.get('display') or metric['label']}"
        sides = sorted([(x, x is lower) for x in (lower, higher) if len(x)], key=lambda x: -len(x[0]))
        text = f"{a} {verb} " + " and ".join(part(x, low) for x, low in sides) + f" than {b}"
        same = rows[rows["diff"] == 0]
        if len(same):
            text += f", and the same at {len(same)} ({_layers([int(x) for x in same['layer']])})"
    else:
        text = f"{a} and {b} have the same {metric.get('display') or metric['label']} at every layer ({n} of {n})"
    lo, hi = float(big["ci_low"]), float(big["ci_high"])
    if float(big["diff"]) != 0:
        text += (f"; largest gap at layer {int(big['layer'])} (difference {float(big['diff']):.3g}{u}"
                 + (f", 95% CI {lo:.3g} to {hi:.3g}" if math.isfinite(lo) and math.isfinite(hi) else "") + ")")
    ok = rows[(rows["ci_low"] > 0) | (rows["ci_high"] < 0)]
    if rows["ci_low"].notna().any():
        text += f"; the 95% CI excludes 0 at {len(ok)} of {n} layer{'s' if n > 1 else ''}"
    return {"text": text + ".", "layers": n, "largest_layer": int(big["layer"]), "largest": float(big["diff"]),
            "excludes_zero": len(ok)}


def _profile_sentence(metric: Mapping[str, Any], name: str, rows: list[list]) -> str:
    """One model alone: where its per-layer mean is lowest and highest, and the reference level."""
    unit = str(metric.get("unit") or "")
    u = f" {unit}" if unit else ""
    rows = [r for r in rows if r[2] is not None and math.isfinite(r[2])]
    if not rows:
        return f"{name}: no finite value."
    lo = min(rows, key=lambda r: r[2])
    hi = max(rows, key=lambda r: r[2])
    ref = (metric.get("refs") or {}).get(name)
    return (f"{name}: {metric.get('display') or metric['label']} (mean over heads) is lowest at layer {lo[1]} "
            f"({short(lo[2])}{u}) and highest at layer {hi[1]} ({short(hi[2])}{u})"
            + (f"; {metric.get('ref_name') or 'uniform attention'} gives {short(ref)}{u}" if ref is not None else "")
            + ".")


def findings(metrics: Sequence[Mapping[str, Any]], models: Sequence[Mapping[str, Any]],
             layers: Mapping[str, list[list]], contrasts: pd.DataFrame | None,
             group_by: str = "training") -> list[dict[str, Any]]:
    """Per metric, what the report opens with: ``{"metric": label, "sentences": [...], "pairs": [...]}``.

    Args:
        metrics: the page's metric entries (``label``, ``name``, ``display``, ``unit``, ``refs``).
        models: the page's model entries (``name``, ``group``), in the page's order.
        layers: per metric label, rows ``[model index, layer, mean, ci_low, ci_high, n]``.
        contrasts: the contrast table (:func:`probekit.views.contrasts.contrasts`), or None.

    A group pair's sentence names the direction and size of the difference of group means at each
    layer both groups have, where it is largest with its 95% CI, and at how many layers the CI
    excludes 0; with one group, each model's lowest and highest layer.
    """
    members: dict[str, list[str]] = {}
    for m in models:
        members.setdefault(str(m["group"]), []).append(str(m["name"]))
    out = []
    for metric in metrics:
        label = metric["label"]
        rows = contrasts[contrasts["metric"].astype(str) == label] if contrasts is not None and len(contrasts) else None
        sentences, pairs = [], []
        if rows is not None and len(rows):
            keys = list(dict.fromkeys(zip(rows["group_a"].astype(str), rows["group_b"].astype(str), strict=True)))
            for ga, gb in keys[:MAX_PAIRS]:
                sub = rows[(rows["group_a"].astype(str) == ga) & (rows["group_b"].astype(str) == gb)]
                s = _pair_sentence(metric, sub, _side(ga, members.get(ga, [ga])), _side(gb, members.get(gb, [gb])))
                sentences.append(s["text"])
                pairs.append({"a": ga, "b": gb, **{k: v for k, v in s.items() if k != "text"}})
            if len(keys) > MAX_PAIRS:
                sentences.append(f"{len(keys) - MAX_PAIRS} more group pair(s) in the contrast table below.")
        else:
            by_model: dict[int, list[list]] = {}
            for r in layers.get(label, []):
                by_model.setdefault(int(r[0]), []).append(r)
            for i, rs in list(by_model.items())[:MAX_PAIRS]:
                sentences.append(_profile_sentence(metric, str(models[i]["name"]), rs))
            if len(members) == 1 and len(models) > 1:
                sentences.append(f"All models are in one {group_by} group ({next(iter(members))}): nothing to "
                                 "contrast (give models different training, or set report.group_by).")
        out.append({"metric": label, "sentences": sentences, "pairs": pairs})
    return out

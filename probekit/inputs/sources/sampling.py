"""Seeded subsets of an image list: plain, or stratified by label.

One sampler for every source (folders, manifests, shards, datasets), so ``count`` and
``seed`` pick the same images whatever lists them. The chosen indices are returned sorted:
images are probed in listing order, which keeps shards contiguous and runs reproducible.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["sample_indices"]


def _perm(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()


def sample_indices(n: int, count: int | None, seed: int = 0, labels: Sequence | None = None,
                   stratify: bool = False) -> list[int]:
    """Sorted indices of a seeded random subset of ``count`` of ``n`` images.

    With ``stratify`` each label keeps its share of the set (largest-remainder rounding, ties
    broken by label order), so a 1,000-image sample of ImageNet-val holds one image per class.

    >>> sample_indices(10, 3, seed=1) == sample_indices(10, 3, seed=1)
    True
    >>> idx = sample_indices(8, 4, labels=list("aaaaaabb"), stratify=True)
    >>> sorted("aaaaaabb"[i] for i in idx)
    ['a', 'a', 'a', 'b']
    """
    if count is None or count >= n:
        return list(range(n))
    if not stratify or labels is None:
        return sorted(_perm(n, seed)[:count])
    groups: dict = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    order = sorted(groups, key=str)
    quota = {lab: count * len(groups[lab]) / n for lab in order}
    take = {lab: int(q) for lab, q in quota.items()}
    rest = count - sum(take.values())
    for lab in sorted(order, key=lambda k: -(quota[k] - take[k]))[:rest]:
        take[lab] += 1
    out: list[int] = []
    for j, lab in enumerate(order):
        members = groups[lab]
        out += [members[k] for k in _perm(len(members), seed + j)[:take[lab]]]
    return sorted(out)

"""The eval-mode check: under ``Adapter.evaluating()``, the context the engine and every check run
the model in, no module runs in train mode, no dropout is active, and the same input gives the same
attention twice. A model left in train mode fails many checks (the reference, batch independence,
outputs under the tap) for a reason none of them can name; this one names it, and
:func:`~probekit.testing.runner.check_adapter` points the others to it.
"""

from __future__ import annotations

import contextlib

from torch import nn

from probekit.testing.capture import ModelCalls
from probekit.testing.tapping import adapter_of, kit_input, tapped

__all__ = ["check_eval_mode", "TRAIN_MODE"]

ATOL = 1e-6  # two runs of one float32 forward agree bit for bit on a CPU; dropout moves them by ~1e-1
TRAIN_MODE = "the model is in train mode / dropout active: call model.eval()"


def _matters(m: nn.Module) -> bool:
    """A module whose train mode changes what it computes (dropout, drop-path, batch statistics)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or "drop" in type(m).__name__.lower()


@contextlib.contextmanager
def _training_modules(model, seen: list[str]):
    """Within: the names (and kinds) of the modules that run in train mode, appended to ``seen``."""
    if not isinstance(model, nn.Module):
        yield
        return
    names = {m: n for n, m in model.named_modules()}

    def note(m, args):
        if m.training and _matters(m):
            seen.append(f"{names.get(m) or type(m).__name__} ({type(m).__name__})")

    handles = [m.register_forward_pre_hook(note) for m in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_eval_mode(name: str, pm) -> str:
    # Probing measures the model, not one draw of its dropout: under Adapter.evaluating() (where the
    # engine and every check run it) every module must be in eval mode, no dropout may run, and two
    # forwards of the same input must give the same attention.
    ad = adapter_of(pm)
    x = kit_input(ad, 2, seed=9)
    training: list[str] = []
    calls = ModelCalls(attention=False)
    with ad.evaluating():
        with _training_modules(ad.model, training), calls:
            first = tapped(ad, x, calls=calls)[0].probs
        second = tapped(ad, x)[0].probs
    dev = max(((first[i] - second[i]).abs().max().item() if first[i].shape == second[i].shape else float("inf"))
              for i in first if i in second) if first else 0.0
    drops = [r for r in dict.fromkeys(calls.randomness) if "dropout" in r]
    causes = []
    if training:
        causes.append(f"modules in train mode during the forward: {', '.join(dict.fromkeys(training[:4]))} "
                      f"({type(ad).__name__}.evaluating() must put every module in eval mode: do not override it, "
                      "nor call .train() in forward)")
    if drops:
        causes.append(f"active dropout: {', '.join(drops[:3])} (F.dropout defaults to training=True: pass "
                      "training=self.training)")
    if dev > ATOL:
        causes.append(f"the same input gave attention {dev:.3g} apart in two forwards")
    assert not (training or drops), f"{name}: {TRAIN_MODE}: " + "; ".join(causes) + "."
    rand = ", ".join(dict.fromkeys(calls.randomness))
    assert dev <= ATOL, (f"{name}: {causes[0] if causes else ''}: the model is not deterministic at inference"
                      + (f" (random operations: {rand})" if rand else "") + ".")
    return "eval mode: no module in train mode, no dropout, the same attention twice"

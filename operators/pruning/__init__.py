"""Token pruning methods for the joint audio+video stream. `make_pruner` is the one registry."""

from __future__ import annotations

from operators.pruning.attention import FastAVPruner, FastVPruner
from operators.pruning.baselines import RandomPruner, UniformPruner
from operators.pruning.budget import make_budget

PRUNERS = {
    "random": RandomPruner,
    "uniform": UniformPruner,
    "fastv": FastVPruner,
    "fastav": FastAVPruner,
}
METHODS = ("none", *PRUNERS)


def make_pruner(name: str, retention: float = 1.0, budget: str = "fixed", c_ref: float | None = None, **options):
    """A PruneHook for --pruner NAME, or None for "none"."""
    if name == "none":
        return None
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(METHODS)}")
    return PRUNERS[name](make_budget(budget, retention, c_ref), **options)

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


def resolve_retention(name: str, retention: float | None, num_layers: int) -> float:
    """--retention, or the method's published default when it is not given (1.0 for "none")."""
    if retention is not None:
        return float(retention)
    return 1.0 if name == "none" else PRUNERS[name].paper_retention(num_layers)


def make_pruner(name: str, retention: float | None = 1.0, budget: str = "fixed", c_ref: float | None = None,
                num_layers: int = 28, **options):
    """A PruneHook for --pruner NAME, or None for "none"."""
    if name == "none":
        return None
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(METHODS)}")
    return PRUNERS[name](make_budget(budget, resolve_retention(name, retention, num_layers), c_ref), **options)

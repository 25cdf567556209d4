"""Token pruning methods for the joint audio+video stream. `make_pruner` is the one registry."""

from __future__ import annotations

import functools
from pathlib import Path

from operators.models.fingerprint import file_sha1
from operators.pruning.attention import FastAVPruner, FastVPruner
from operators.pruning.baselines import RandomPruner, UniformPruner
from operators.pruning.budget import make_budget
from operators.pruning.learned import AvexPruner, EchoingPixelsPruner, LearnedPruner, default_weights

PRUNERS = {
    "random": RandomPruner,
    "uniform": UniformPruner,
    "fastv": FastVPruner,
    "fastav": FastAVPruner,
    "echoingpixels": EchoingPixelsPruner,
    "avex": AvexPruner,
}
METHODS = ("none", *PRUNERS)
PRE_LLM_METHODS = tuple(name for name, cls in PRUNERS.items() if cls.pre_llm)  # those the vLLM engine runs


def resolve_retention(name: str, retention: float | None, num_layers: int) -> float:
    """--retention, or the method's published default when it is not given (1.0 for "none")."""
    if retention is not None:
        return float(retention)
    return 1.0 if name == "none" else PRUNERS[name].paper_retention(num_layers)


def make_pruner(name: str, retention: float | None = 1.0, budget: str = "fixed", c_ref: float | None = None,
                num_layers: int = 28, weights: str | None = None, model_source: str | None = None,
                model_version: str | None = None, allow_foreign_weights: bool = False, **options):
    """A PruneHook for --pruner NAME, or None for "none". Trained methods load `weights`, by default the
    ones shipped next to the model (`<model_source>/pruners/<name>.safetensors`), and refuse weights
    trained for another captioner version than `model_version` unless allow_foreign_weights."""
    if name == "none":
        return None
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(METHODS)}")
    cls = PRUNERS[name]
    if issubclass(cls, LearnedPruner):
        options.update(weights=weights, model_source=model_source, model_version=model_version,
                       allow_foreign_weights=allow_foreign_weights)
    return cls(make_budget(budget, resolve_retention(name, retention, num_layers), c_ref), **options)


def weights_digest(name: str, weights: str | None, model_source: str) -> str | None:
    """Short sha1 of the weights file a trained method would load (None for the other methods, or when the
    file is absent): part of the caption key, so a rerun after retraining does not skip as already done."""
    cls = PRUNERS.get(name)
    if cls is None or not issubclass(cls, LearnedPruner):
        return None
    path = Path(weights) if weights else default_weights(model_source, name)
    if not path.is_file():
        return None
    return file_sha1(path)


def calibrated_c_ref(name: str, retention: float, signals: list, num_layers: int, weights: str | None = None,
                     model_source: str | None = None) -> float:
    """The adaptive budget's reference content level for method `name` on a sample's content `signals`,
    calibrated on the method's own compute (Pruner.compute_share), so that its run meets `retention`."""
    from operators.pruning.budget import AdaptiveBudget

    method = make_pruner(name, retention, weights=weights, model_source=model_source)
    share = functools.partial(method.compute_share, num_layers=num_layers)
    return AdaptiveBudget(retention).calibrate(signals, share)

"""Train AVEX with the exchange's log-probability as Plackett-Luce's (pl, what train_pruner does) or as the
earlier sum of per-token log-softmax terms (naive), everything else the same: the A/B of BENCHMARKS.md.

    python -m benchmarks.avex_objective {pl,naive} --method avex --data DIR --steps N --seed S --out FILE
"""

import sys

import pipelines.train_pruner as train_pruner


def naive_log_prob(logits, order):
    """The earlier objective: every draw priced as a softmax over all tokens, as if none had been drawn."""
    return logits.log_softmax(-1)[order].sum()


def main(argv: list[str]) -> int:
    variant, rest = argv[0], argv[1:]
    if variant == "naive":
        train_pruner.plackett_luce_log_prob = naive_log_prob  # avex_step looks it up at call time
    elif variant != "pl":
        raise SystemExit("first argument: pl or naive")
    return train_pruner.main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

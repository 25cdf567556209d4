"""`avsieve <command> ...`: one console script for every job in pipelines/."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "caption": "pipelines.caption",
    "synthesize": "pipelines.synthesize",
    "evaluate": "pipelines.evaluate",
    "train-captioner": "pipelines.train_captioner",
    "train-pruner": "pipelines.train_pruner",
    "build-test-model": "pipelines.build_test_model",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: avsieve {" + ",".join(COMMANDS) + "} [options]  (each command has --help)")
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

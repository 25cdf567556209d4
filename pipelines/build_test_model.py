"""`avsieve build-test-model --family qwen3-omni|qwen2.5-omni --out DIR`: a tiny random thinker checkpoint.

Real transformers classes, real processor and tokenizer files (a byte-level BPE of our own with the
family's special tokens and a chat template), a small config; nothing is downloaded. Tests and
benchmarks run the caption job and the pruning equivalence tests on it. The trained pruners
(echoingpixels, avex) get random-weight nets of the model's shape in DIR/pruners/, recorded for this
checkpoint, so every --pruner runs on it (their choices mean nothing: the weights are untrained).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = ("qwen3-omni", "qwen2.5-omni")


def build(family: str, out: str | Path, seed: int = 0, pruners: bool = True) -> Path:
    out = Path(out)
    if family == "qwen3-omni":
        from operators.models.qwen3_omni import build_tiny

        build_tiny(out, seed)
    elif family == "qwen2.5-omni":
        from operators.models.embedded import build_untrained

        build_untrained(out, seed)
    else:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    if pruners:
        write_random_pruners(out, seed)
    return out


def write_random_pruners(model_dir: Path, seed: int = 0) -> None:
    """Untrained EchoingPixels / AVEX nets for this checkpoint (the sieve starts as the decoder's layer 0,
    as training would start it)."""
    import torch

    from operators.models.fingerprint import model_version
    from operators.models.qwen2_5_omni import load_thinker
    from operators.pruning.learned import WEIGHTS_DIR, PolicyNet, SieveNet, save_net

    torch.manual_seed(seed)
    thinker = load_thinker(str(model_dir), torch.float32, "cpu", "sdpa")
    text_config = thinker.config.get_text_config()
    sieve = SieveNet(text_config, 1, per_modality=True, selection="stratified")
    sieve.init_from_decoder(thinker.model.language_model.layers)
    version = model_version(str(model_dir))
    report = {"note": "random weights from avsieve build-test-model: for tests, not for captions"}
    for net in (sieve, PolicyNet(text_config.hidden_size)):
        save_net(net, model_dir / WEIGHTS_DIR / f"{net.method}.safetensors", report, model_version=version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avsieve build-test-model", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen3-omni")
    parser.add_argument("--out", required=True, help="folder to write (from_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pruners", action="store_true", help="skip the random echoingpixels/avex nets")
    args = parser.parse_args(argv)
    print(build(args.family, args.out, args.seed, pruners=not args.no_pruners))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# The README's first command: set up, then caption sample clips with the embedded model on a local Ray
# cluster: the bundled real clips plus three clips of the synthetic world the model was trained on and
# one clip's sound alone (made here in about a second; the model knows only that world, so only those captions are meaningful).
# Captions and a JSON summary are printed; Parquet lands in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out/demo-input
.venv/bin/python -m pipelines.synthesize --out out/demo-input --n 3 --seed 7 --split test --workers 1 >/dev/null
# and one clip's sound alone (an .m4a without video), captioned from its audio
.venv/bin/python -m pipelines.synthesize --out out/demo-input/sound --n 1 --seed 12 --split test --workers 1 \
    --sound-only >/dev/null
cp tests/data/clips/*.mp4 out/demo-input/
exec .venv/bin/avsieve caption --input out/demo-input --output out/demo --progress false "$@"

#!/usr/bin/env bash
# The README's first command: set up, then caption the bundled sample clips with the embedded model
# on a local Ray cluster. Captions and a JSON summary are printed; Parquet lands in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/avsieve caption --input tests/data/clips --output out/demo --progress false "$@"

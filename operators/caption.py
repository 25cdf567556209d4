"""GPU (or CPU) stage: prepared window rows -> output rows with captions.

`CaptionActor` loads the model once per actor; `caption_rows` is the plain function it calls, so the
stage can be tested on a list of dicts without Ray. A failure in a batch is retried row by row, and a
row that still fails becomes an error row: nothing is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from operators import tokenize as tok
from operators.prepare import error_text
from operators.schema import conform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionSettings:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    pruner: str = "none"
    budget: str = "fixed"
    retention: float | None = None  # None = the method's published default
    budget_c_ref: float | None = None  # adaptive budget's calibrated content level (pipelines/caption.py)
    config_hash: str = ""


def _output_row(row: dict, settings: CaptionSettings, label: str) -> dict:
    out = {k: row.get(k) for k in ("clip_id", "source_id", "uri", "window_index", "start_s", "end_s", "prompt",
                                   "status", "error", "error_kind", "has_audio", "decode_ms", "schema_version")}
    out.update(model=label, pruner=settings.pruner, budget=settings.budget, config_hash=settings.config_hash)
    return out


class Captioner:
    """A loaded model plus its pruning setup; captions lists of prepared rows."""

    def __init__(self, settings: CaptionSettings):
        from operators.models.qwen2_5_omni import OmniThinker

        self.settings = settings
        self.thinker = OmniThinker(settings.model, settings.device, settings.dtype, settings.attn_implementation)
        from operators.pruning import make_pruner, resolve_retention

        layers = self.thinker.model.config.get_text_config().num_hidden_layers
        self.retention = resolve_retention(settings.pruner, settings.retention, layers)
        self.hook = make_pruner(settings.pruner, self.retention, settings.budget, settings.budget_c_ref)

    def _caption(self, rows: list[dict]) -> list[dict]:
        samples = [tok.unpack(r["model_inputs"]) for r in rows]
        return self.thinker.caption(samples, self.settings.max_new_tokens, hook=self.hook,
                                    temperature=self.settings.temperature, seed=self.settings.seed)

    def caption_rows(self, rows: list[dict]) -> list[dict]:
        out = [_output_row(r, self.settings, self.thinker.label) | {"retention_target": self.retention}
               for r in rows]
        todo = [i for i, r in enumerate(rows) if r.get("status") == "ok"]
        groups = [todo] if todo else []
        while groups:
            group = groups.pop()
            try:
                results = self._caption([rows[i] for i in group])
            except Exception as err:  # noqa: BLE001 - isolate the failing row
                if len(group) > 1:
                    log.warning("batch of %d failed (%s); retrying one by one", len(group), error_text(err))
                    groups.extend([i] for i in group)
                    continue
                out[group[0]].update(status="error", error=error_text(err), error_kind="model")
                continue
            for i, result in zip(group, results):
                out[i].update(status="ok", error=None, error_kind=None,
                              **{k: v for k, v in result.items() if k != "kept_per_layer"})
        return out


class CaptionActor:
    """Ray Data callable class: one model per actor, batches in and out as Arrow tables."""

    def __init__(self, settings: CaptionSettings):
        self.captioner = Captioner(settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return conform(self.captioner.caption_rows(batch.to_pylist()))

"""The HF engine: avsieve's decoder loop over the transformers thinker (operators/models/), with every
pruning method, beam search and the repeated-sentence ban."""

from __future__ import annotations

from operators import tokenize as tok


class HfCaptioner:
    def __init__(self, settings):
        from operators.models.qwen2_5_omni import OmniThinker
        from operators.pruning import make_pruner, resolve_retention

        self.settings = settings
        self.thinker = OmniThinker(settings.model, settings.device, settings.dtype, settings.attn_implementation)
        self.label = self.thinker.label
        layers = self.thinker.model.config.get_text_config().num_hidden_layers
        self.retention = resolve_retention(settings.pruner, settings.retention, layers)
        self.hook = make_pruner(settings.pruner, self.retention, settings.budget, settings.budget_c_ref,
                                weights=settings.pruner_weights, model_source=self.thinker.source,
                                model_version=settings.model_version,
                                allow_foreign_weights=settings.allow_foreign_pruner_weights)
        # Which captioner version the trained pruner's weights were made for (null for other methods).
        self.pruner_weights_version = getattr(self.hook, "weights_version", None)

    def caption(self, blobs: list[bytes]) -> list[dict]:
        s = self.settings
        results = self.thinker.caption([tok.unpack(b) for b in blobs], s.max_new_tokens, hook=self.hook,
                                       temperature=s.temperature, seed=s.seed, num_beams=s.num_beams,
                                       no_repeat_sentences=s.no_repeat_sentences)
        return [{k: v for k, v in r.items() if k not in ("kept_per_layer", "kept_media")} for r in results]

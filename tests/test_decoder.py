"""The pruning-aware decoder against Hugging Face's own forward/generate on the real thinker class."""

import pytest
import torch

from operators.models.decoder import TEXT
from operators.models.qwen2_5_omni import OmniThinker
from operators.pruning import make_pruner
from tests.model_samples import make_sample


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def thinker(request):
    torch.manual_seed(0)
    return OmniThinker(None, attn_implementation=request.param)


@pytest.fixture(scope="module")
def samples(thinker):
    p = thinker.processor
    return [make_sample(p, 1), make_sample(p, 2, frames=12, seconds=6.0),
            make_sample(p, 3, frames=6, seconds=3.0, audio=None), make_sample(p, 4, seconds=3.0, video=None)]


def _audio_in_video(sample) -> bool:
    """What transformers' use_audio_in_video is for this window: audio interleaved with its video (not sound alone)."""
    return "input_features" in sample and "pixel_values_videos" in sample


def _hf_inputs(sample):
    inputs = dict(sample)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def test_prefill_logits_match_hf_forward(thinker, samples):
    for sample in samples:
        ours = thinker.decoder.prefill(thinker.embed(thinker.collate([sample])).state).logits
        with torch.no_grad():
            ref = thinker.model(**_hf_inputs(sample), use_audio_in_video=_audio_in_video(sample)).logits[:, -1]
        torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


def test_greedy_caption_matches_hf_generate(thinker, samples):
    for sample in samples:
        ours = thinker.caption([sample], max_new_tokens=10)[0]["caption"]
        out = thinker.model.generate(**_hf_inputs(sample), use_audio_in_video=_audio_in_video(sample),
                                     max_new_tokens=10, do_sample=False)
        ref = thinker.processor.tokenizer.decode(out[0, sample["input_ids"].shape[1]:], skip_special_tokens=True)
        assert ours == ref.strip()


def test_batch_equals_one_by_one(thinker, samples):
    batched = thinker.decoder.prefill(thinker.embed(thinker.collate(samples)).state).logits
    for b, sample in enumerate(samples):
        single = thinker.decoder.prefill(thinker.embed(thinker.collate([sample])).state).logits
        torch.testing.assert_close(batched[b], single[0], atol=1e-4, rtol=1e-4)
    captions = [r["caption"] for r in thinker.caption(samples, 8)]
    assert captions == [thinker.caption([s], 8)[0]["caption"] for s in samples]


def test_pre_llm_pruning_equals_forward_on_kept_tokens_with_original_positions(thinker, samples):
    """Pruned prefill + cached decoding == a plain no-cache forward over the kept tokens (padded batch)."""
    emb = thinker.embed(thinker.collate(samples[:2]))
    hook = make_pruner("random", 0.3)
    pre = thinker.decoder.prefill(emb.state, hook=hook, extras=emb.extras)
    tokens = thinker.decoder.decode(pre, 6, eos_token_ids=[])  # no early stop: compare all 6 steps
    lm = thinker.model.model.language_model
    for b in range(2):
        src = pre.final_state.source_index[b]
        src = src[src >= 0]
        offset = emb.state.valid.shape[1] - int(emb.state.valid[b].sum())  # left padding of sample b
        idx = src + offset
        embeds = emb.state.hidden[b:b + 1, idx]
        pos = emb.state.position_ids[:, b:b + 1, idx]
        # Kept tokens carry their original position ids; text tokens are all kept.
        assert torch.equal(pre.final_state.position_ids[:, b, -len(src):], pos[:, 0])
        n_text = int((emb.state.modality[b] == TEXT).sum())
        assert int((pre.final_state.modality[b] == TEXT).sum()) == n_text
        next_pos = int(emb.state.position_ids[:, b][:, emb.state.valid[b]].max()) + 1
        for step, token in enumerate(tokens[b]):
            with torch.no_grad():
                out = lm(inputs_embeds=embeds, position_ids=pos)
                logits = thinker.model.lm_head(out.last_hidden_state[:, -1])
            assert int(logits.argmax()) == token, f"sample {b} step {step}"
            new = lm.embed_tokens(torch.tensor([[token]]))
            embeds = torch.cat([embeds, new], dim=1)
            pos = torch.cat([pos, torch.full((3, 1, 1), next_pos + step)], dim=2)


@pytest.fixture(scope="module")
def unsure_thinker():
    """The embedded model with its language model perturbed, so that its next-token choices are close
    calls and beam search finds captions greedy decoding does not."""
    torch.manual_seed(0)
    thinker = OmniThinker(None)
    with torch.no_grad():
        for weight in thinker.model.model.language_model.parameters():
            weight.add_(torch.randn_like(weight) * 0.02)
    return thinker


def test_beam_search_matches_hf_generate(unsure_thinker, samples):
    thinker, differs_from_greedy = unsure_thinker, 0
    for beams in (2, 4):
        for sample in samples:
            ours = thinker.caption([sample], max_new_tokens=16, num_beams=beams)[0]["caption"]
            out = thinker.model.generate(**_hf_inputs(sample), use_audio_in_video=_audio_in_video(sample),
                                         max_new_tokens=16, do_sample=False, num_beams=beams,
                                         length_penalty=1.0, early_stopping=False)
            ref = thinker.processor.tokenizer.decode(out[0, sample["input_ids"].shape[1]:], skip_special_tokens=True)
            assert ours == ref.strip()
            differs_from_greedy += ours != thinker.caption([sample], max_new_tokens=16)[0]["caption"]
    assert differs_from_greedy  # otherwise this test would not tell beam search from greedy decoding


@pytest.mark.parametrize("pruner", ["none", "fastav"])
@pytest.mark.parametrize("model", ["unsure", "trained"])
def test_beam_search_batch_equals_one_by_one(unsure_thinker, thinker, samples, pruner, model):
    """Beams of different rows never mix, also when pruning leaves each layer a different cache length,
    and when rows that are done leave the batch (the trained model ends its captions at different steps;
    the perturbed one runs to the limit)."""
    chosen = unsure_thinker if model == "unsure" else thinker
    hook = make_pruner(pruner, 0.3) if pruner != "none" else None
    decoder, rows_fed = chosen.decoder, []
    feed = decoder._next_logits
    decoder._next_logits = lambda token, *args: rows_fed.append(len(token)) or feed(token, *args)
    try:
        batched = chosen.caption(samples, 48, hook=hook, num_beams=3)
    finally:
        del decoder._next_logits
    assert rows_fed[0] == 3 * len(samples)
    if model == "trained":
        assert min(rows_fed) < rows_fed[0]
    for sample, row in zip(samples, batched):
        single = chosen.caption([sample], 48, hook=hook, num_beams=3)[0]
        assert (row["caption"], row["caption_truncated"]) == (single["caption"], single["caption_truncated"])


def test_beam_search_refuses_sampling(thinker, samples):
    prefill = thinker.decoder.prefill(thinker.embed(thinker.collate(samples[:1])).state)
    with pytest.raises(ValueError, match="temperature"):
        thinker.decoder.decode(prefill, 4, thinker.eos_token_ids, temperature=1.0, num_beams=2)

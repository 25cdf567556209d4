"""Probe: stock vLLM on a Qwen3-Omni thinker against transformers (issue 31 item 3, docs/qwen3-omni.md).

    .venv-vllm/bin/python scripts/probe_vllm_qwen3_omni.py [--work /tmp/q3]

Not the engine (operators/engines/vllm_model.py is): how it was found what stands between vLLM 0.32's own
Qwen3-Omni model and an exact one (docs/qwen3-omni.md). It builds the tiny random test thinker, wraps its
config as the engine does (qwen3_omni.vllm_config) but for stock vLLM's class, translates the
audio-in-video kwarg for transformers 5's processor, runs one 3-s window (`--case`) and prints whether
vLLM's prompt ids, positions, merged embeddings, DeepStack rows, per-step log-probabilities and float32
greedy tokens equal transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def vllm_folder(thinker: Path, out: Path) -> Path:
    """A folder vLLM builds Qwen3-Omni from with its own classes: the thinker's files linked, its config
    wrapped as the engine wraps it (qwen3_omni.vllm_config), naming stock vLLM's class."""
    from operators.models.qwen3_omni import vllm_config

    out.mkdir(parents=True, exist_ok=True)
    for path in thinker.iterdir():
        if path.name != "config.json" and not (out / path.name).exists():
            (out / path.name).symlink_to(path.resolve())
    config = vllm_config(json.loads((thinker / "config.json").read_text()))
    config["architectures"] = ["Qwen3OmniMoeForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def patch_vllm(seen: dict) -> None:
    """transformers 5 spells audio-in-video load_audio_from_video; record the positions vLLM computes."""
    from vllm.model_executor.models import qwen3_omni_moe_thinker as q3

    processor, model = q3.Qwen3OmniMoeThinkerMultiModalProcessor, q3.Qwen3OmniMoeThinkerForConditionalGeneration
    call, positions = processor._call_hf_processor, model.get_mrope_input_positions

    def call_hf(self, hf_data, hf_kwargs):
        if hf_kwargs.get("use_audio_in_video") and hf_data.get("audio"):
            hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != "use_audio_in_video"}
            hf_kwargs.update(load_audio_from_video=True,
                             audio_from_video_indices=list(range(len(hf_data.get("videos") or []))))
        return call(self, hf_data, hf_kwargs)

    def spy(self, input_tokens, mm_features, *args, **kwargs):
        seen["positions"] = positions(self, input_tokens, mm_features, *args, **kwargs)
        return seen["positions"]

    processor._call_hf_processor, model.get_mrope_input_positions = call_hf, spy

    embed, set_deepstack = model.embed_input_ids, model._set_deepstack_input_embeds

    def keep_embeds(self, input_ids, *args, **kwargs):  # the prefill's merged embeddings (the first call)
        out = embed(self, input_ids, *args, **kwargs)
        seen.setdefault("embeds", out.detach().clone())
        return out

    def keep_deepstack(self, embeds):
        seen.setdefault("deepstack", embeds.detach().clone())
        return set_deepstack(self, embeds)

    model.embed_input_ids, model._set_deepstack_input_embeds = keep_embeds, keep_deepstack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/avsieve-qwen3-vllm-probe")
    parser.add_argument("--case", choices=("av", "video", "sound", "wav"), default="av",
                        help="audio-in-video, video without sound, sound alone (.m4a: AAC frames pad it past "
                             "3 s), or sound alone of exactly 3 s (.wav)")
    args = parser.parse_args()
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    import dataclasses

    import torch
    from vllm import LLM, SamplingParams

    import media
    from operators import tokenize as tok
    from operators.caption import CaptionSettings
    from operators.engines import make_engine
    from operators.models.positions import tmrope_positions
    from operators.prepare import PrepareSettings, prepare_local
    from pipelines.build_test_model import build

    work = Path(args.work)
    thinker = work / "model"
    if not (thinker / "config.json").is_file():
        build("qwen3-omni", thinker, pruners=False)
    if args.case == "sound":
        clip = media.write_sound(work / "sound.m4a", seconds=3.0)
    elif args.case == "wav":
        clip = media.write_sound(work / "sound.wav", seconds=3.0, codec="pcm_s16le", sample_fmt="s16")
    else:
        clip = media.write_clip(work / f"{args.case}.mp4", seconds=3.0, audio="tone" if args.case == "av" else None)
    settings = PrepareSettings(model=str(thinker), prompt="Describe the clip.", max_pixels=160 * 160,
                               min_pixels=64 * 64)
    source = {"source_id": "a", "uri": str(clip), "prompt": None, "clip_id": None}
    compact = tok.unpack_compact(next(prepare_local(source, dataclasses.replace(settings, window_form="compact")))
                                 ["model_inputs"])
    tensors = tok.unpack(next(prepare_local(source, settings))["model_inputs"])

    seen: dict = {}
    patch_vllm(seen)
    llm = LLM(model=str(vllm_folder(thinker, work / "vllm")), dtype="float32", max_model_len=4096,
              limit_mm_per_prompt={"image": 0, "video": 1, "audio": 1}, enforce_eager=True)
    data, kwargs = {}, {}
    if compact["frames"] is not None:
        data["video"] = compact["frames"]
        kwargs = {"fps": compact["fps"], "size": compact["size"], "use_audio_in_video": compact["audio"] is not None}
    if compact["audio"] is not None:
        data["audio"] = (compact["audio"], tok.SAMPLE_RATE)
    request = {"prompt": compact["prompt_text"], "multi_modal_data": data, "mm_processor_kwargs": kwargs}
    output = llm.generate([request], SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0]

    hf = make_engine(CaptionSettings(model=str(thinker), device="cpu", dtype="float32", max_new_tokens=8))
    config = hf.thinker.model.config
    grid, mask = tensors.get("video_grid_thw"), tensors.get("feature_attention_mask")
    reference, delta = tmrope_positions(config, tensors["input_ids"].reshape(1, -1),
                                        grid.reshape(1, 3) if grid is not None else None,
                                        mask.sum(-1) if mask is not None else None,
                                        tensors.get("video_second_per_grid"))
    got, got_delta = seen["positions"]
    hf_caption = hf.thinker.caption([tensors], 8)[0]["caption"]
    vllm_caption = hf.thinker.processor.tokenizer.decode(
        [t for t in output.outputs[0].token_ids if t not in hf.thinker.eos_token_ids], skip_special_tokens=True).strip()
    hf_seen = {}
    language_model = hf.thinker.model.model.language_model
    language_model.register_forward_pre_hook(
        lambda module, args, kwargs: hf_seen.setdefault("inputs", kwargs) and None, with_kwargs=True)
    batch = {k: v for k, v in tensors.items() if k != "video_second_per_grid"}
    with torch.no_grad():
        hf.thinker.model(**batch, video_second_per_grid=tensors.get("video_second_per_grid"),
                         use_audio_in_video=compact["audio"] is not None and compact["frames"] is not None)
    hf_embeds = hf_seen["inputs"]["inputs_embeds"][0]
    rows_differ = ((hf_embeds - seen["embeds"]).abs().amax(-1) > 1e-5).nonzero().flatten().tolist()
    deepstack = {}
    if "deepstack" in seen and hf_seen["inputs"].get("deepstack_visual_embeds") is not None:
        mask = hf_seen["inputs"]["visual_pos_masks"][0]
        for level, rows in enumerate(hf_seen["inputs"]["deepstack_visual_embeds"]):
            got_rows = seen["deepstack"][level][:mask.numel()][mask]
            deepstack[level] = float((got_rows - rows).abs().max())
    print(json.dumps({"embedding_rows_that_differ": rows_differ, "deepstack_max_abs_diff": deepstack}))
    # Step by step: transformers' generate scores against vLLM's logprobs of its own top tokens.
    with torch.no_grad():
        generated = hf.thinker.model.generate(
            **batch, video_second_per_grid=tensors.get("video_second_per_grid"), max_new_tokens=8, do_sample=False,
            use_audio_in_video=compact["audio"] is not None and compact["frames"] is not None,
            output_scores=True, return_dict_in_generate=True)
    for step, (scores, logprobs) in enumerate(zip(generated.scores, output.outputs[0].logprobs)):
        hf_logprobs = torch.log_softmax(scores[0].float(), -1)
        print(json.dumps({"step": step, "vllm_token": output.outputs[0].token_ids[step],
                          "hf_token": int(generated.sequences[0, batch["input_ids"].shape[-1] + step]),
                          "logprob_diffs": {t: round(lp.logprob - float(hf_logprobs[t]), 6) for t, lp in logprobs.items()}}))
    print(json.dumps({
        "prompt_ids_equal": list(output.prompt_token_ids) == compact["input_ids"].tolist(),
        "prompt_tokens": {"vllm": len(output.prompt_token_ids), "hf": int(compact["input_ids"].numel())},
        "positions_equal": bool(torch.equal(torch.as_tensor(got).float(), reference[:, 0].float())),
        "decode_delta": [int(got_delta), int(delta)],
        "greedy_captions_equal": vllm_caption == hf_caption,
        "captions": {"vllm": vllm_caption, "hf": hf_caption},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

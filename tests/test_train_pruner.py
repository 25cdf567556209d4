"""pipelines.train_pruner end to end: in this process, and under Ray Train with two CPU workers."""

import json

from safetensors import safe_open

from operators.models.qwen2_5_omni import load_thinker, resolve_model_source
from operators.pruning.learned import load_net
from pipelines.train_pruner import PrunerTrainConfig, train


def _text_config():
    import torch

    return load_thinker(resolve_model_source("embedded"), torch.float32, "cpu", "sdpa").config.get_text_config()


def _report(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["report"])


def test_echoingpixels_in_process_self_distills_without_references(real_clips, tmp_path):
    out = train(PrunerTrainConfig(method="echoingpixels", data=str(real_clips), out=str(tmp_path / "ep.safetensors"),
                                  n_train=2, steps=2, batch_size=2, max_new_tokens=4))
    assert load_net(out, _text_config()).method == "echoingpixels"
    report = _report(out)
    assert report["steps_done"] == 2 and report["workers"] == 1


def test_avex_under_ray_train_with_two_workers(ray_cluster, real_clips, tmp_path):
    # A time budget far below one step: the workers agree to stop after their first step.
    out = train(PrunerTrainConfig(method="avex", data=str(real_clips), out=str(tmp_path / "avex.safetensors"),
                                  n_train=3, steps=4, batch_size=1, max_new_tokens=4, workers=2,
                                  cpus_per_worker=0.5, max_minutes=1e-4))
    assert load_net(out, _text_config()).method == "avex"
    report = _report(out)
    assert report["workers"] == 2 and report["steps_done"] == 1


def _write_cache(folder, key: str | None) -> None:
    """A tokenized.pt whose one item is recognisable (its file name is made up) and, if key, its key file."""
    import torch

    item = {"file": "from-cache.mp4", "caption": None, "inputs": {"input_ids": torch.ones(1, 3, dtype=torch.long)}}
    torch.save([item], folder / "tokenized.pt")
    if key:
        (folder / "tokenized.json").write_text(json.dumps({"key": key}))


def test_data_cache_is_used_only_when_keyed_to_the_models_processor(real_clips, tmp_path):
    import shutil
    from pathlib import Path

    from pipelines.train_captioner import cache_settings, tokenization_key
    from pipelines.train_pruner import load_windows

    source = resolve_model_source("embedded")
    key = tokenization_key(cache_settings(Path(source)), Path(source))
    for stored, from_cache in ((key, True), ("0" * 16, False), (None, False)):
        folder = tmp_path / f"data-{stored}"
        shutil.copytree(real_clips, folder)
        _write_cache(folder, stored)
        files = {item["file"] for item in load_windows(str(folder), source, limit=1)}
        # A stale or unkeyed cache is ignored and the clips themselves are tokenized for this model.
        assert (files == {"from-cache.mp4"}) == from_cache, stored
        assert from_cache or files <= {p.name for p in real_clips.iterdir()}


def test_exchange_log_probability_is_plackett_luce():
    """Draws without replacement: the probabilities of every ordered draw sum to one, and match how often
    torch.multinomial (the trainer's sampler) draws them. Per-token softmax terms summed do neither."""
    import itertools

    import torch

    from pipelines.train_pruner import plackett_luce_log_prob

    logits = torch.tensor([2.0, 0.5, -1.0, 0.0])
    orders = list(itertools.permutations(range(4), 2))
    pl = {o: float(plackett_luce_log_prob(logits, torch.tensor(o)).exp()) for o in orders}
    naive = {o: float(logits.log_softmax(-1)[list(o)].sum().exp()) for o in orders}
    assert abs(sum(pl.values()) - 1.0) < 1e-6 and abs(sum(naive.values()) - 1.0) > 0.05
    gen = torch.Generator().manual_seed(0)
    draws = [tuple(torch.multinomial(logits.softmax(-1), 2, generator=gen).tolist()) for _ in range(20000)]
    for order in orders:
        assert abs(draws.count(order) / len(draws) - pl[order]) < 0.01, order

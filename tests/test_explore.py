"""The stage explorer's computations (evotok.explore), without Gradio."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evotok.explore as explore_mod
from evotok import EvoTok, small_config
from evotok.explore import (Explorer, ModelCard, codebook_figure, codes_figure, codes_from_json, codes_to_json,
                            metrics_figure, parse_labels, prepare_image, probe_figure, probe_rows, read_model_card,
                            stage_features, umap_figure, upscale_for_display)
from evotok.hub import weights_digest
from evotok.images import ImageError
from evotok.metrics import psnr, semantic_cosine
from evotok.probe import DEFAULT_LABELS
from evotok.teacher import TinySigLIPConfig, TinySigLIPTeacher
from helpers import ColourTeacher

SIZE, GRID, STAGES = 32, 4, 4


def tiny_config(**overrides):
    fields = dict(image_size=SIZE, channels=(16, 16, 32, 32), norm_num_groups=8, num_stages=STAGES,
                  codebook_size=64, code_dim=8, pixel_depth=2, semantic_depth=STAGES, semantic_layers=1,
                  semantic_width=32, semantic_heads=2, teacher_dim=3, teacher=None)
    return small_config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    model = EvoTok(tiny_config())
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, SIZE, SIZE) * 2 - 1)  # initialises the codebooks from data
    return model.eval()


@pytest.fixture(scope="module")
def explorer(tok):
    return Explorer(tok, ColourTeacher(GRID, SIZE), ModelCard(max_train_depth=3), source="tiny")


def solid_png(rgb=(220, 30, 30), size=(48, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, rgb if mode == "RGB" else rgb + (128,)).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- inputs
def test_parse_labels_splits_cleans_and_deduplicates():
    assert parse_labels("red,  green\nblue; Red ,, ") == ["red", "green", "blue"]
    assert parse_labels(["a  cat", "dog"]) == ["a cat", "dog"]
    assert parse_labels("") == DEFAULT_LABELS
    assert parse_labels(None) == DEFAULT_LABELS
    with pytest.raises(ValueError, match="at most"):
        parse_labels(",".join(f"label {i}" for i in range(explore_mod.MAX_LABELS + 1)))
    with pytest.raises(ValueError, match="longer than"):
        parse_labels("x" * (explore_mod.MAX_LABEL_CHARS + 1))


def test_prepare_image_normalises_and_says_how():
    tensor, note = prepare_image(solid_png(size=(60, 30), mode="RGBA"), SIZE)
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    assert "composited onto white" in note and "centre-cropped to a 30×30 square" in note and "50%" in note
    assert f"{SIZE}×{SIZE}" in note
    with pytest.raises(ImageError, match="not an image"):
        prepare_image(b"this is not an image", SIZE)


def test_upscale_for_display_uses_integer_nearest_factor():
    small = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    big = upscale_for_display(small, 64)
    assert big.size == (64, 64)
    assert np.array_equal(np.asarray(big)[::4, ::4], np.asarray(small))
    assert upscale_for_display(big, 64) is big


# --------------------------------------------------------------------------- model card
def test_read_model_card_front_matter_and_sections(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: cc0-1.0\nmax_train_depth: 6\n---\n# Tiny EvoTok\n\nA summary.\n\n"
        "## Training data\n\nScenes, clip art and Fashion-MNIST, 64 px.\n")
    card = read_model_card(tmp_path)
    assert card.title == "Tiny EvoTok" and card.max_train_depth == 6
    assert card.trained_on == "Scenes, clip art and Fashion-MNIST, 64 px."
    assert card.metadata["license"] == "cc0-1.0"
    (tmp_path / "README.md").write_text("---\ntrained_on: photos\ntrained_pixel_depths: [1, 2, 3]\n---\nBody.\n")
    card = read_model_card(tmp_path)
    assert card.trained_on == "photos" and card.max_train_depth == 3
    (tmp_path / "README.md").write_text("---\n: : [unbalanced\n---\nStill readable.\n")
    assert read_model_card(tmp_path).trained_on == "Still readable."
    assert read_model_card(tmp_path / "missing") == ModelCard()


# --------------------------------------------------------------------------- explore
def test_explore_matches_the_tokenizer_depth_by_depth(tok, explorer):
    result = explorer.explore(solid_png(), "red, green, blue")
    assert result.depths == list(range(1, STAGES + 1))
    assert result.reconstructions.shape == (STAGES, 3, SIZE, SIZE)
    x = result.image[None]
    codes = tok.encode(x)
    assert torch.equal(result.codes, codes[0])
    teacher_feats = explorer.teacher.image_features(x)
    for i, depth in enumerate(result.depths):
        single = tok.decode(codes, depth=depth)[0]
        assert torch.allclose(result.reconstructions[i], single, atol=1e-4)
        assert result.psnr[i] == pytest.approx(float(psnr(single[None], x)), abs=1e-3)
        feats = tok.semantic_features(codes, depth=depth)
        assert result.semantic_cosine[i] == pytest.approx(float(semantic_cosine(feats, teacher_feats)), abs=1e-4)
    probe = result.probe
    assert probe.labels == ["red", "green", "blue"] and probe.probs.shape == (STAGES, 3)
    assert np.allclose(probe.probs.sum(axis=1), 1.0, atol=1e-5)
    # the hand-built teacher sees a red image as red
    assert probe.top(None, 1)[0][0] == "red"
    assert result.seconds > 0


def test_roles_captions_and_summary_mark_the_depths(explorer):
    result = explorer.explore(torch.zeros(3, SIZE, SIZE), "red, blue")
    assert result.roles(2) == ["pixel depth"]
    assert result.roles(3) == []
    assert result.roles(STAGES) == ["semantic depth", "off-distribution"]
    assert "Lpix" in result.caption(2) and "dB" in result.caption(2)
    assert "off-distribution" in result.caption(STAGES, long=True)
    summary = result.summary_markdown()
    assert "off-distribution" in summary and f"{STAGES}" in summary
    gallery = result.gallery(min_side=64)
    assert len(gallery) == STAGES and gallery[0][0].size == (64, 64)
    headers, rows = probe_rows(result, k=2)
    assert headers[0] == "depth" and len(rows) == STAGES + 1 and rows[-1][0] == "teacher"


def test_codes_json_round_trip_decodes_the_same_picture(tok, explorer):
    result = explorer.explore(solid_png((30, 200, 40)), "green, red")
    payload = json.loads(json.dumps(codes_to_json(result, "tiny")))
    assert payload["grid"] == [GRID, GRID] and payload["num_stages"] == STAGES
    codes = codes_from_json(payload)
    assert torch.equal(codes[0], result.codes)
    assert torch.allclose(tok.decode(codes, depth=STAGES)[0], result.reconstructions[-1], atol=1e-4)
    with pytest.raises(ValueError, match="evotok-codes"):
        codes_from_json({"codes": []})


def test_explorer_without_teacher_still_explores(tok):
    bare = Explorer(tok, None, teacher_note="no teacher here")
    result = bare.explore(solid_png())
    assert result.probe is None and result.semantic_cosine is None
    assert "no teacher here" in result.summary_markdown()
    assert probe_rows(result)[1] == []
    assert probe_figure(result).layout.annotations[0].text == "no teacher here"
    names = [trace.name for trace in metrics_figure(result).data]
    assert names[:2] == ["PSNR (dB)", "SSIM"] and "cosine to teacher" not in names


def test_mismatched_teacher_is_refused_with_a_note(tok):
    wrong = TinySigLIPTeacher(TinySigLIPConfig(image_size=32, patch_size=16, width=8, depth=2, num_heads=2, embed_dim=8))
    guarded = Explorer(tok, wrong)
    assert guarded.teacher is None and "do not match" in guarded.teacher_note


# --------------------------------------------------------------------------- figures
def test_figures_carry_the_numbers(explorer):
    result = explorer.explore(solid_png(), "red, green, blue")
    fig = metrics_figure(result)
    names = [trace.name for trace in fig.data]
    assert names[:3] == ["PSNR (dB)", "SSIM", "cosine to teacher"]
    assert list(fig.data[0].y) == pytest.approx(result.psnr)
    line_x = sorted({shape.x0 for shape in fig.layout.shapes if shape.type == "line"})
    assert line_x == [result.pixel_depth, result.semantic_depth]
    assert any(shape.type == "rect" and shape.x0 == result.max_train_depth + 0.5 for shape in fig.layout.shapes)

    heat = probe_figure(result).data[0]
    assert np.asarray(heat.z).shape == (3, STAGES + 1) and list(heat.x)[-1] == "teacher"

    codes = codes_figure(result)
    assert len(codes.data) == STAGES
    assert np.array_equal(np.asarray(codes.data[1].z), result.codes[:, :, 1].numpy())


def test_codebook_stats_and_figure(explorer):
    stats = explorer.codebook_stats()
    assert set(stats) >= {"usage", "perplexity", "dead_codes"}
    assert len(stats["usage"]) == STAGES and all(0 <= u <= 1 for u in stats["usage"])
    fig = codebook_figure(stats, explorer.config.codebook_size)
    assert [len(trace.y) for trace in fig.data] == [STAGES] * 3
    assert list(fig.data[2].y) == stats["dead_codes"]
    assert f"{STAGES} stages" in explorer.codebook_markdown(stats)


# --------------------------------------------------------------------------- stage features and UMAP cache
@pytest.mark.parametrize("kind, width", [("semantic", 3), ("latent", 8)])
def test_stage_features_shapes(explorer, kind, width):
    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    feats = stage_features(explorer, images, kind, batch_size=2)
    assert feats.shape == (STAGES, 5, width)
    if kind == "latent":  # the last depth's pooled latent is the pooled full prefix sum
        codes = explorer.tok.encode(images)
        full = explorer.tok.quantizer.codes_to_latent(codes, STAGES).mean(dim=(1, 2))
        assert np.allclose(feats[-1], full.numpy(), atol=1e-5)


def test_umap_is_cached_in_memory_and_on_disk(tok, tmp_path, monkeypatch):
    calls = []

    def fake_embedding(features, seed=0, metric="euclidean"):  # UMAP itself is exercised by the app test
        calls.append(features.shape)
        return features[:, :2].astype(np.float32)

    images = torch.rand(6, 3, SIZE, SIZE) * 2 - 1
    fake_set = explore_mod.SampleSet(images=images, labels=["a", "b"] * 3, sources=["s"] * 6, notes=[])
    monkeypatch.setattr(explore_mod, "umap_embedding", fake_embedding)
    monkeypatch.setattr(explore_mod, "load_sample_set", lambda *a, **k: explore_mod.SampleSet(
        images=fake_set.images, labels=list(fake_set.labels), sources=list(fake_set.sources)))
    first = Explorer(tok, ColourTeacher(GRID, SIZE))
    messages = []
    emb, samples, cached = first.umap(2, "latent", cache_dir=tmp_path, per_source=2,
                                      progress=lambda f, m: messages.append((f, m)))
    assert emb.shape == (6, 2) and not cached and samples.labels == fake_set.labels
    assert messages[-1][0] == 1.0 and len(calls) == 1
    assert first.umap(2, "latent", cache_dir=tmp_path, per_source=2)[2] is True
    second = Explorer(tok, ColourTeacher(GRID, SIZE))  # a new process: reads the disk cache
    emb2, _, cached2 = second.umap(2, "latent", cache_dir=tmp_path, per_source=2)
    assert cached2 and np.array_equal(emb, emb2) and len(calls) == 1
    assert len(list(tmp_path.glob("*.npz"))) == 2
    fig = umap_figure(emb, samples, 2, "latent", colour_by="label")
    assert sorted(trace.name for trace in fig.data) == ["a", "b"]
    with pytest.raises(ValueError, match="depth"):
        first.umap(STAGES + 1, "latent")
    with pytest.raises(ValueError, match="kind"):
        first.umap(1, "pixels")


# --------------------------------------------------------------------------- loading
def test_load_finds_the_teacher_named_in_the_config(tmp_path):
    teacher = TinySigLIPTeacher(TinySigLIPConfig(image_size=SIZE, patch_size=SIZE // GRID, width=24, depth=2,
                                                 num_heads=2, embed_dim=16))
    teacher.save_pretrained(tmp_path / "assets" / "teacher")
    model = EvoTok(tiny_config(teacher_dim=24, teacher="assets/teacher"))
    model.save_pretrained(tmp_path / "assets" / "tokenizer")
    (tmp_path / "assets" / "tokenizer" / "README.md").write_text("---\nmax_train_depth: 3\n---\n# Tiny\n\nTrained on noise.\n")
    loaded = Explorer.load(tmp_path / "assets" / "tokenizer", search_dirs=[tmp_path])
    assert loaded.teacher is not None and loaded.max_train_depth == 3
    assert "Trained on noise." in loaded.describe() and f"{SIZE}×{SIZE}" in loaded.describe()
    alone = Explorer.load(tmp_path / "assets" / "tokenizer", teacher="none")
    assert alone.teacher is None and "none" in alone.teacher_note
    with pytest.raises(Exception):
        Explorer.load(tmp_path / "assets" / "tokenizer", teacher=str(tmp_path / "no-such-teacher"))


def test_a_teacher_other_than_the_one_trained_against_is_refused(tmp_path):
    def make_teacher(seed: int) -> TinySigLIPTeacher:
        torch.manual_seed(seed)
        return TinySigLIPTeacher(TinySigLIPConfig(image_size=SIZE, patch_size=SIZE // GRID, width=24, depth=2,
                                                  num_heads=2, embed_dim=16))

    trained_against, other = make_teacher(0), make_teacher(1)
    model = EvoTok(tiny_config(teacher_dim=24, teacher_sha256=weights_digest(trained_against)))
    assert Explorer(model, trained_against).teacher is not None
    refused = Explorer(model, other)  # same shapes, different weights: its probe would be meaningless
    assert refused.teacher is None and "not the one the tokenizer was trained against" in refused.teacher_note
    # the fingerprint survives a save/load round trip; tokenizers without one accept any fitting teacher
    model.save_pretrained(tmp_path / "tok")
    assert EvoTok.from_pretrained(tmp_path / "tok").config.teacher_sha256 == weights_digest(trained_against)
    assert Explorer(EvoTok(tiny_config(teacher_dim=24)), other).teacher is not None


def test_a_teacher_with_a_refitted_readout_still_matches_the_feature_pin():
    torch.manual_seed(0)
    config = TinySigLIPConfig(image_size=SIZE, patch_size=SIZE // GRID, width=24, depth=2, num_heads=2, embed_dim=16)
    trained_against = TinySigLIPTeacher(config)
    refitted = TinySigLIPTeacher(config)
    refitted.load_state_dict(trained_against.state_dict())
    with torch.no_grad():  # a new readout: last block, projections, logit bias; the patch features stay
        for name, param in refitted.named_parameters():
            if not name.startswith(refitted.feature_prefixes):
                param.add_(0.1)
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert torch.equal(refitted.image_features(images), trained_against.image_features(images))
    assert refitted.feature_digest() == trained_against.feature_digest()
    assert weights_digest(refitted) != weights_digest(trained_against)
    pins = {"teacher_sha256": weights_digest(trained_against), "teacher_features_sha256": trained_against.feature_digest()}
    model = EvoTok(tiny_config(teacher_dim=24, **pins))
    assert Explorer(model, refitted).teacher is not None
    with torch.no_grad():  # a change to the features themselves is refused
        refitted.pos_embed.add_(0.1)
    refused = Explorer(model, refitted)
    assert refused.teacher is None and "not the one the tokenizer was trained against" in refused.teacher_note


def test_the_bundled_tokenizer_accepts_the_bundled_teacher():
    from evotok.config import EvoTokConfig
    from evotok.hub import config_from_dict
    from evotok.teacher import load_teacher

    config = config_from_dict(EvoTokConfig, json.loads(Path("assets/tokenizer/config.json").read_text()))
    teacher = load_teacher(config.teacher)
    assert config.teacher_features_sha256 == teacher.feature_digest()

"""``evotok.mllm.serving`` on a tiny random model: prompt checks, seeded generation with a row preview,
cancelling, seeds, conversations that fit the context, vocabulary, examples and loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evotok.data.scenes import HELDOUT_PAIRS
from evotok.images import ImageError
from evotok.mllm import EmptyPromptError, PromptTooLongError
from evotok.mllm.serving import (DEFAULT_TEMPERATURE, EXAMPLE_PROMPTS, MAX_PROMPT_CHARS, GenerationCancelled,
                                 MultimodalService, example_prompts, heldout_pairs_in)
from test_mllm import build, image_tok, text_tok, tiny_tokenizer  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def service(image_tok, text_tok):  # noqa: F811
    return MultimodalService(build(image_tok, text_tok), source="tiny")


def test_prompts_are_cleaned_and_checked(service):
    check = service.check_prompt("  a  red\n zebra circle ")
    assert check.text == "a red zebra circle" and check.unknown_words == ["zebra"] and check.tokens > 0
    assert not check.unconditional
    assert service.check_prompt("   ").unconditional and service.check_prompt(None).text == ""
    with pytest.raises(PromptTooLongError, match=f"at most {service.max_prompt_tokens} tokens"):
        service.check_prompt(" ".join(["a red circle above a blue square"] * 6))
    with pytest.raises(PromptTooLongError, match="characters"):
        service.check_prompt("x" * (MAX_PROMPT_CHARS + 1))


def test_same_seed_same_image_with_a_row_preview(service):
    rows: list[tuple[int, Image.Image]] = []
    first = service.generate("a red circle", seed=5, on_row=lambda r, im: rows.append((r, im)))
    again = service.generate("a red circle", seed=5)
    grid, size = service.grid_size, service.image_size
    assert torch.equal(first.codes, again.codes) and first.seed == 5
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.image.size == (size, size) and first.codes.shape == (grid, grid, service.pixel_depth)
    assert len(first.stages) == service.pixel_depth
    assert np.array_equal(np.asarray(first.stages[-1]), np.asarray(first.image))
    assert [r for r, _ in rows] == list(range(1, grid + 1))
    r, preview = rows[1]
    pixels = np.asarray(preview)
    cut = size * r // grid
    assert (pixels[cut:] == 128).all()  # rows not drawn yet are grey
    assert np.array_equal(np.asarray(rows[-1][1]), np.asarray(first.image))  # the last preview is the image


def test_random_seed_is_reported_and_reproduces(service):
    drawn = service.generate("two yellow triangles", seed=None)
    assert 0 <= drawn.seed <= 2**31 - 1
    assert torch.equal(service.generate("two yellow triangles", seed=drawn.seed).codes, drawn.codes)
    assert 0 <= service.pick_seed(-1) and service.pick_seed(12.0) == 12
    with pytest.raises(ValueError, match="whole number"):
        service.pick_seed(1.5)
    with pytest.raises(ValueError, match="temperature"):
        service.generate("a red circle", temperature=-1, seed=0)


def test_candidates_keep_the_models_own_pick_and_report_the_scores(service):
    from evotok.mllm.rerank import generate_best_of

    one = service.generate("a red circle", seed=5)
    assert one.candidate_scores == [] and one.settings["candidates"] == 1
    rows: list[int] = []
    best = service.generate("a red circle", seed=5, candidates=3, on_row=lambda r, im: rows.append(r))
    codes, scores = generate_best_of(service.model, ["a red circle"], 3, seed=5, guidance_scale=3.0,
                                    temperature=DEFAULT_TEMPERATURE)
    assert torch.equal(best.codes, codes[0]) and best.candidate_scores == pytest.approx(scores[0].tolist())
    assert rows == list(range(1, service.grid_size + 1))  # the first candidate's rows were previewed
    for bad in (0, 1.5, service.max_candidates + 1):
        with pytest.raises(ValueError, match="candidates"):
            service.generate("a red circle", seed=5, candidates=bad)
    other = "contrast" if best.settings["judge"] == "caption" else "caption"
    judged = service.generate("a red circle", seed=5, candidates=3, judge=other)
    codes, scores = generate_best_of(service.model, ["a red circle"], 3, seed=5, guidance_scale=3.0, judge=other,
                                    temperature=DEFAULT_TEMPERATURE)
    assert judged.settings["judge"] == other and torch.equal(judged.codes, codes[0])
    assert judged.candidate_scores == pytest.approx(scores[0].tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="judge"):
        service.generate("a red circle", seed=5, candidates=3, judge="oracle")


def test_a_row_callback_can_cancel(service):
    def stop(rows, preview):
        if rows == 2:
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        service.generate("a red circle", seed=0, on_row=stop)


def test_questions_are_checked_and_old_turns_dropped_to_fit(service):
    with pytest.raises(EmptyPromptError, match="empty"):
        service.prepare_question("  ")
    with pytest.raises(PromptTooLongError, match="question"):
        service.prepare_question(" ".join(["What colour is the star?"] * 10))
    history = [(f"How many circles are there? {i}", "two") for i in range(200)]
    prepared = service.prepare_question("What colour is the star?", history)
    assert 0 < prepared.dropped_turns < len(history)
    assert prepared.history == history[prepared.dropped_turns:]  # the most recent turns are kept
    image = torch.rand(3, service.image_size, service.image_size) * 2 - 1
    answer = "".join(service.answer(image, prepared))
    assert answer == service.model.answer(image, "What colour is the star?", history=prepared.history, stream=False)


def test_uploads_go_through_the_safe_loader(service, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError):
        service.prepare_image(str(tmp_path / "notes.txt"))
    Image.new("RGB", (90, 60), (200, 20, 20)).save(tmp_path / "wide.png")
    tensor, note = service.prepare_image(str(tmp_path / "wide.png"))
    assert tensor.shape == (3, service.image_size, service.image_size) and "centre-cropped" in note


def test_vocabulary_groups_place_every_known_word_once(service):
    groups = service.vocabulary_groups()
    placed = [w for words in groups.values() for w in words]
    assert sorted(placed) == service.known_words() and len(placed) == len(set(placed))
    assert {"red", "blue"} <= set(groups["colours"]) and "circle" in groups["shapes"]


def test_examples_name_held_out_and_seen_pairs():
    assert heldout_pairs_in("Two RED stars and a star that is black") == [
        p for p in [("red", "star"), ("black", "star")] if p in HELDOUT_PAIRS]
    split = example_prompts()
    assert sorted(split["seen"] + split["held-out"]) == sorted(EXAMPLE_PROMPTS)
    assert len(split["seen"]) >= 2 and len(split["held-out"]) >= 2
    assert all(heldout_pairs_in(p) for p in split["held-out"]) and not any(map(heldout_pairs_in, split["seen"]))


def test_load_shares_the_tokenizer_only_when_its_weights_match(image_tok, text_tok, tmp_path):  # noqa: F811
    image_tok.save_pretrained(tmp_path / "tokenizer")
    build(image_tok, text_tok, path="tokenizer").save_pretrained(tmp_path / "mllm")
    (tmp_path / "mllm" / "README.md").write_text("# Tiny card\n\nsome words\n")
    shared = MultimodalService.load(tmp_path / "mllm", shared_tokenizer=image_tok)
    assert shared.model.tokenizer is image_tok and shared.card_title == "Tiny card"
    own = MultimodalService.load(tmp_path / "mllm", shared_tokenizer=tiny_tokenizer(seed=3))
    assert own.model.tokenizer is not image_tok
    assert "Tiny card" in own.describe() and f"at most {own.max_prompt_tokens} tokens" in own.describe()


def test_a_planning_model_reports_its_plan_and_the_app_shows_it(image_tok, text_tok):  # noqa: F811
    from app.multimodal_callbacks import MultimodalCallbacks

    planner = MultimodalService(build(image_tok, text_tok, layout_plan=True, max_plan_tokens=3), source="tiny")
    drawn = planner.generate("a red circle", seed=5)
    assert isinstance(drawn.plan, str) and drawn.plan == planner.generate("a red circle", seed=5).plan
    note = MultimodalCallbacks(planner).note(drawn)
    assert "Layout plan" in note and (drawn.plan in note if drawn.plan else "*(empty)*" in note)
    assert planner.generate("", seed=5).plan == ""  # the unconditional sample writes no plan


def test_a_model_without_plans_reports_none(service):
    assert service.generate("a red circle", seed=5).plan is None

"""evotok.mllm.rerank: the caption score is the training loss's own quantity, and best-of-n keeps
the candidate it scores highest."""
from __future__ import annotations

import pytest
import torch

from evotok.mllm.chat import encode_chat
from evotok.mllm.data import DESCRIBE_QUESTIONS, collate
from evotok.mllm.rerank import caption_log_likelihood, generate_best_of
from test_mllm import build, tiny_text_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return build(tiny_tokenizer(), tiny_text_tokenizer(), grid_rope=True)


def test_caption_score_is_minus_the_lm_loss_of_that_conversation(model):
    torch.manual_seed(0)
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4, 4))
    captions = ["a red circle", "two blue squares", ""]
    scores = caption_log_likelihood(model, codes, captions)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    for k, caption in enumerate(captions):
        encoded = encode_chat(model.text, [(DESCRIBE_QUESTIONS[0], caption)], model.config.num_cells)
        item = {"task": "scene_qa", "image_codes": codes[k].numpy(), "gen_codes": None,
                "input_ids": encoded.input_ids, "labels": encoded.labels, "image_mask": encoded.image_mask,
                "gen_mask": encoded.gen_mask}
        batch = {key: value for key, value in collate([item], model.text.ids["pad"]).items() if key != "tasks"}
        with torch.no_grad():
            loss = model(**batch).lm_loss
        assert scores[k].item() == pytest.approx(-loss.item(), abs=1e-5)  # batched with padding, same value


def test_caption_score_needs_one_caption_per_image(model):
    with pytest.raises(ValueError, match="captions"):
        caption_log_likelihood(model, torch.zeros(2, 4, 4, 4, dtype=torch.long), ["a red circle"])


def test_best_of_one_is_the_plain_image_and_best_of_n_keeps_the_top_scored(model):
    prompts = ["a red circle", "a blue square"]
    plain = model.generate_image(prompts, seed=3)
    one, _ = generate_best_of(model, prompts, 1, seed=3)
    assert torch.equal(one, plain)

    best, scores = generate_best_of(model, prompts, 3, seed=3, judge="caption")
    assert best.shape == plain.shape and scores.shape == (2, 3)
    drawn = model.generate_image([p for p in prompts for _ in range(3)], seed=3).view(2, 3, *plain.shape[1:])
    for k in range(2):
        assert torch.equal(best[k], drawn[k, int(scores[k].argmax())])
    full = model.encode_images(model.decode_codes(drawn.flatten(0, 1)).clamp(-1, 1))
    again = caption_log_likelihood(model, full, [p for p in prompts for _ in range(3)]).view(2, 3)
    assert torch.allclose(again, scores, atol=1e-5)
    with pytest.raises(ValueError, match="at least 1"):
        generate_best_of(model, prompts, 0)


def test_candidates_are_drawn_per_prompt_and_picked_among_their_own(model):
    from evotok.mllm.rerank import draw_candidates, pick_best

    drawn = draw_candidates(model, ["a red circle", "a blue square"], 2, seed=4)
    assert drawn.shape[:2] == (2, 2)
    best, scores = pick_best(model, ["a red circle", "a blue square"], drawn)  # the default judge
    for k in range(2):  # each prompt keeps one of its own two drawings
        assert any(torch.equal(best[k], drawn[k, j]) for j in range(2)) and scores.shape == (2, 2)
    with pytest.raises(ValueError, match="prompts"):
        pick_best(model, ["a red circle"], drawn)


def test_a_caption_total_is_its_mean_times_its_scored_tokens(model):
    torch.manual_seed(1)
    codes = torch.randint(0, model.config.codebook_size, (2, 4, 4, 4))
    captions = ["a red circle", "two blue squares on a striped background"]
    mean = caption_log_likelihood(model, codes, captions)
    total = caption_log_likelihood(model, codes, captions, per_token=False)
    for k, caption in enumerate(captions):
        scored = (torch.tensor(encode_chat(model.text, [(DESCRIBE_QUESTIONS[0], caption)],
                                           model.config.num_cells).labels) != -100).sum()
        assert total[k].item() == pytest.approx(mean[k].item() * int(scored), rel=1e-5)


def test_the_contrast_score_is_the_prompts_share_among_its_near_misses(model):
    from evotok.mllm.near_miss import near_misses
    from evotok.mllm.rerank import contrast_scores

    torch.manual_seed(2)
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4, 4))
    prompts = ["a red circle", "a blue square left of a green star", "a cat on a mat"]
    scores = contrast_scores(model, codes, prompts, images_per_batch=2)  # images split across batches
    for k, prompt in enumerate(prompts[:2]):
        group = [prompt] + near_misses(prompt)
        totals = caption_log_likelihood(model, codes[k:k + 1].expand(len(group), -1, -1, -1), group, per_token=False)
        assert scores[k].item() == pytest.approx((totals[0] - torch.logsumexp(totals, 0)).item(), abs=1e-4)
        assert scores[k] < 0
    assert scores[2] == 0  # no scene words, no near misses: nothing to contrast with
    with pytest.raises(ValueError, match="prompts"):
        contrast_scores(model, codes, prompts[:2])


def test_the_contrast_judge_keeps_its_top_scored_candidate(model):
    from evotok.mllm.rerank import contrast_scores, draw_candidates, pick_best, read_back

    prompts = ["a red circle", "two blue squares"]
    drawn = draw_candidates(model, prompts, 3, seed=5)
    best, scores = pick_best(model, prompts, drawn, judge="contrast")
    full = model.encode_images(model.decode_codes(drawn.flatten(0, 1)).clamp(-1, 1))
    again = contrast_scores(model, full, [p for p in prompts for _ in range(3)]).view(2, 3)
    assert torch.allclose(again, scores, atol=1e-4)
    for k in range(2):
        assert torch.equal(best[k], drawn[k, int(scores[k].argmax())])
    with pytest.raises(ValueError, match="judge"):
        pick_best(model, prompts, drawn, judge="oracle")
    # candidates read back once serve any judge: the same scores as reading them inside pick_best
    read = read_back(model, drawn)
    assert torch.equal(read.flatten(0, 1), full)
    assert torch.allclose(pick_best(model, prompts, drawn, judge="contrast", read=read)[1], scores)


def test_the_question_score_sums_the_log_probabilities_of_the_prompts_answers(model):
    from evotok.mllm.prompt_checks import prompt_checks
    from evotok.mllm.rerank import question_scores

    torch.manual_seed(3)
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4, 4))
    prompts = ["three green crosses", "a red circle left of a blue square", "a cat on a mat"]
    scores = question_scores(model, codes, prompts, images_per_batch=2)  # images split across batches
    for k, prompt in enumerate(prompts[:2]):
        checks = prompt_checks(prompt)
        assert len(checks) >= 2
        # each answer scored as a one-turn conversation's answer: its tokens and end token
        expected = sum(caption_log_likelihood(model, codes[k:k + 1], [answer], question=question,
                                              per_token=False).item() for question, answer in checks)
        assert scores[k].item() == pytest.approx(expected, abs=1e-4)
    assert scores[2] == 0  # no scene words: no checks
    with pytest.raises(ValueError, match="prompts"):
        question_scores(model, codes, prompts[:2])


def test_the_question_judges_keep_their_top_scored_candidate(model):
    from evotok.mllm.rerank import contrast_scores, draw_candidates, pick_best, question_scores, read_back

    prompts = ["a red circle", "two blue squares"]
    drawn = draw_candidates(model, prompts, 3, seed=6)
    read = read_back(model, drawn)
    repeated = [p for p in prompts for _ in range(3)]
    questions = question_scores(model, read.flatten(0, 1), repeated).view(2, 3)
    both = questions + contrast_scores(model, read.flatten(0, 1), repeated).view(2, 3)
    for judge, expected in (("questions", questions), ("contrast+questions", both)):
        best, scores = pick_best(model, prompts, drawn, judge=judge, read=read)
        assert torch.allclose(scores, expected, atol=1e-5)
        for k in range(2):
            assert torch.equal(best[k], drawn[k, int(scores[k].argmax())])

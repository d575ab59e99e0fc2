"""evotok.mllm.read_back: images read as the model's own drawings are, for training the view its judge gets."""
from __future__ import annotations

import pytest
import torch

from evotok.mllm.chat import encode_chat
from evotok.mllm.data import DESCRIBE_QUESTIONS, collate
from evotok.mllm.read_back import read_back_codes, read_back_some
from evotok.mllm.rerank import read_back
from test_mllm import build, tiny_text_tokenizer, tiny_tokenizer
from test_onset_weights import square_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(tiny_tokenizer(), tiny_text_tokenizer())


def test_read_back_is_decoding_at_the_pixel_depth_and_encoding_again(model):
    torch.manual_seed(1)
    depth, full_depth = model.config.pixel_depth, model.tokenizer.config.num_stages
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 4, full_depth))
    by_hand = model.encode_images(model.decode_codes(codes[..., :depth]).clamp(-1, 1))
    read = read_back_codes(model, codes)
    assert read.shape == codes.shape and torch.equal(read, by_hand)
    assert torch.equal(read_back_codes(model, codes[..., :depth]), by_hand)  # deeper stages play no part
    candidates = codes[..., :depth].view(1, 3, 4, 4, depth)
    assert torch.equal(read_back(model, candidates), by_hand.view(1, 3, 4, 4, full_depth))  # the judge's view
    with pytest.raises(ValueError, match="pixel stages"):
        read_back_codes(model, codes[..., :depth - 1])


def test_a_share_of_the_images_is_read_back_and_the_rest_left_alone(model):
    torch.manual_seed(2)
    codes = torch.randint(0, model.config.codebook_size, (16, 4, 4, model.tokenizer.config.num_stages))
    assert read_back_some(model, codes, 0.0) is codes
    assert torch.equal(read_back_some(model, codes, 1.0), read_back_codes(model, codes))
    mixed = read_back_some(model, codes, 0.5, torch.Generator().manual_seed(0))
    chosen = torch.rand(16, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < int(chosen.sum()) < 16
    assert torch.equal(mixed[~chosen], codes[~chosen])
    assert torch.equal(mixed[chosen], read_back_codes(model, codes[chosen]))
    with pytest.raises(ValueError, match="read-back rate"):
        read_back_some(model, codes, -0.1)


def test_the_training_loss_reads_the_images_back_and_leaves_the_drawings(model):
    torch.manual_seed(3)
    codes = torch.randint(0, model.config.codebook_size, (2, 4, 4, model.tokenizer.config.num_stages))
    items = []
    for k, caption in enumerate(["a red circle", "two blue squares"]):
        encoded = encode_chat(model.text, [(DESCRIBE_QUESTIONS[0], caption)], model.config.num_cells)
        items.append({"task": "scene_qa", "image_codes": codes[k].numpy(), "gen_codes": None,
                      "input_ids": encoded.input_ids, "labels": encoded.labels, "image_mask": encoded.image_mask,
                      "gen_mask": encoded.gen_mask})
    questions = {k: v for k, v in collate(items, model.text.ids["pad"]).items() if k != "tasks"}
    drawings = square_batch(model)
    with torch.no_grad():
        read = model(**questions, read_back_rate=1.0)
        by_hand = model(**{**questions, "image_codes": read_back_codes(model, questions["image_codes"])})
        plain = model(**questions)
        drawn_read, drawn_plain = model(**drawings, read_back_rate=1.0), model(**drawings)
    assert torch.allclose(read.lm_loss, by_hand.lm_loss)
    assert not torch.allclose(read.lm_loss, plain.lm_loss)
    assert torch.equal(drawn_read.loss, drawn_plain.loss)  # drawings are targets, never read back


def test_the_benchmark_answers_about_the_images_read_back(model):
    from training.bench_mllm import accuracy

    torch.manual_seed(4)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    questions = ["What colour is the circle?", "How many squares are there?", "Is there a star?"]
    codes = read_back_codes(model, model.encode_images(images))
    assert not torch.equal(codes, model.encode_images(images))  # the read-back view is another input
    expected = model.answer_batch(None, questions, max_new_tokens=12, image_codes=codes)
    assert accuracy(model, images, questions, expected, batch_size=2, read_back=True) == [1, 1, 1]

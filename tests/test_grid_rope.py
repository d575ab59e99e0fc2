"""Row-and-column rotary positions on grid cells (evotok.mllm.grid_rope) and the model using them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from evotok.mllm import EvoTokMLLM
from evotok.mllm.grid_rope import GridRotaryEmbedding, cell_index_of, grid_position_ids, install_grid_rope
from test_mllm import build, random_batch, tensors, tiny_text_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
def parts():
    return tiny_tokenizer(), tiny_text_tokenizer()


def test_cells_are_numbered_within_each_grid_and_text_is_minus_one():
    # text, a 4-cell grid, text, another 4-cell grid, padding
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert cell_index_of(mask, 4).tolist() == [[-1, 0, 1, 2, 3, -1, -1, 0, 1, 2, 3, -1]]


def test_grid_cells_get_row_and_column_streams_and_text_keeps_its_position():
    positions = torch.arange(7)[None] + 10
    cells = torch.tensor([[-1, 0, 1, 2, 3, -1, -1]])  # a 2×2 grid starting at position 11
    sequence, rows, cols = grid_position_ids(positions, cells, grid_size=2)
    assert sequence.tolist() == [list(range(10, 17))]
    assert rows.tolist() == [[10, 11, 11, 12, 12, 15, 16]]
    assert cols.tolist() == [[10, 11, 12, 11, 12, 15, 16]]
    assert torch.equal(grid_position_ids(positions, None, 2), positions.expand(3, 1, 7))
    _, rows, cols = grid_position_ids(positions, cells, grid_size=2, stride=2)  # rows as far apart as in raster order
    assert rows.tolist() == [[10, 11, 11, 13, 13, 15, 16]]
    assert cols.tolist() == [[10, 11, 13, 11, 13, 15, 16]]


def test_rotary_frequencies_are_dealt_to_the_streams_in_turn(parts):
    model = build(*parts)
    rotary = model.lm.base_model.rotary_emb
    wrapped = GridRotaryEmbedding(rotary)
    x = torch.zeros(1, 3, 8)
    plain = torch.tensor([[5, 6, 7]])
    assert all(torch.equal(a, b) for a, b in zip(wrapped(x, plain), rotary(x, plain)))
    assert all(torch.equal(a, b) for a, b in zip(wrapped(x, plain.expand(3, 1, 3)), rotary(x, plain)))

    streams = torch.tensor([[[5, 6, 7]], [[50, 60, 70]], [[500, 600, 700]]])
    cos, sin = wrapped(x, streams)
    per_stream = [rotary(x, s) for s in streams]
    half = cos.shape[-1] // 2
    for channel in range(cos.shape[-1]):
        k = (channel % half) % 3
        assert torch.equal(cos[..., channel], per_stream[k][0][..., channel])
        assert torch.equal(sin[..., channel], per_stream[k][1][..., channel])
    with pytest.raises(ValueError, match="3×B×L"):
        wrapped(x, streams[:2])


def test_switching_on_grid_rope_keeps_text_and_moves_only_grid_cells(parts):
    model = build(*parts)
    ids = torch.randint(0, len(parts[1]), (2, 9))
    embeds = model.lm.get_input_embeddings()(ids)
    mask = torch.ones(2, 9, dtype=torch.long)
    image_mask = torch.zeros(2, 9, dtype=torch.bool)
    image_mask[:, 2:2 + model.config.num_cells // 2] = True  # half a grid is enough to see the effect
    with torch.no_grad():
        text_before, _ = model.backbone(embeds, mask)
        model.add_grid_rope()
        text_after, _ = model.backbone(embeds, mask)
        cells_after, _ = model.backbone(embeds, mask, cell_index=cell_index_of(image_mask, model.config.num_cells))
    assert isinstance(model.lm.base_model.rotary_emb, GridRotaryEmbedding)
    assert torch.allclose(text_before, text_after, atol=1e-6)  # text: the LM's own rotary positions
    assert torch.allclose(cells_after[:, :3], text_before[:, :3], atol=1e-6)  # before and at the first cell
    assert not torch.allclose(cells_after[:, 3:], text_before[:, 3:], atol=1e-4)
    assert not any("rotary" in k for k in model.state_dict())  # no new weights
    with pytest.raises(ValueError, match="already uses"):
        model.add_grid_rope()


def test_grid_rope_model_caches_batches_trains_and_round_trips(parts, tmp_path):
    image_tok, text_tok = parts
    image_tok.save_pretrained(tmp_path / "tokenizer")
    model = build(image_tok, text_tok, path="tokenizer", grid_rope=True)
    prompts = ["a red circle", "two yellow triangles above a blue square"]
    assert torch.equal(model.generate_image(prompts, guidance_scale=2.0, seed=3, use_cache=True),
                       model.generate_image(prompts, guidance_scale=2.0, seed=3, use_cache=False))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    questions = ["What colour is the star?", "Is the circle left or right of the square?"]
    single = [model.answer(images[i], q, max_new_tokens=5, stream=False, use_cache=c).strip()
              for i, q in enumerate(questions) for c in (True, False)]
    assert single[0::2] == single[1::2]  # KV cache
    assert model.answer_batch(images, questions, max_new_tokens=5) == single[0::2]  # left-padded batch

    batch = tensors(random_batch(model, seed=1))
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm.base_model.layers[0].self_attn.q_proj.weight.grad is not None
    model.eval()

    model.save_pretrained(tmp_path / "mllm")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "mllm")
    assert loaded.config.grid_rope and isinstance(loaded.lm.base_model.rotary_emb, GridRotaryEmbedding)
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, loaded(**batch).loss)
    assert torch.equal(model.generate_image("a red circle", seed=5), loaded.generate_image("a red circle", seed=5))


def test_an_lm_without_rotary_positions_is_refused():
    class NoRotary(nn.Module):
        base_model = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="rotary_emb"):
        install_grid_rope(NoRotary())


def test_generation_steps_see_the_positions_training_saw(parts):
    """The hidden state before each generated cell is the same whether the whole sequence runs at
    once (training) or cell by cell from the KV cache (sampling): both give cells the same streams."""
    from evotok.mllm import encode_generation
    from evotok.mllm.generate import _Stepper

    model = build(*parts, grid_rope=True)
    n = model.config.num_cells
    codes = model.generate_image("a red circle", guidance_scale=None, seed=2)  # 1 h w depth
    full = encode_generation(model.text, "a red circle", n, model.config.max_prompt_tokens)
    ids, gen_mask = torch.tensor([full.input_ids]), torch.tensor([full.gen_mask])
    with torch.no_grad():
        embeds = model.embed_inputs(ids, gen_mask=gen_mask, gen_codes=codes)
        hidden, _ = model.backbone(embeds, torch.ones_like(ids), cell_index=model.cell_index(gen_mask=gen_mask))
        before_cells = hidden[0, torch.nonzero(gen_mask[0]).flatten() - 1]
        prefix = int(torch.nonzero(gen_mask[0])[0])
        stepper = _Stepper(model, embeds[:, :prefix], torch.ones(1, prefix, dtype=torch.long), use_cache=True)
        stepped = [stepper.last]
        for cell in range(n - 1):
            stepped.append(stepper.step(embeds[:, prefix + cell], cell=cell))
    assert torch.allclose(torch.cat(stepped), before_cells, atol=1e-5)

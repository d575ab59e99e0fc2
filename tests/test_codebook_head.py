"""The depth transformer's codebook head: codes scored by their vectors in the image tokenizer."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from evotok.mllm import EvoTokMLLM
from evotok.mllm.codebook_head import CodebookHead
from evotok.mllm.config import MLLMConfig
from evotok.mllm.depth_transformer import DepthTransformer
from test_mllm import build, image_tok, random_batch, tensors, text_tok  # noqa: F401  (fixtures)


def test_codes_with_the_same_vector_score_alike_until_their_biases_differ():
    torch.manual_seed(0)
    head = CodebookHead(width=16, depth=2, codebook_size=10, code_dim=4, head_width=8)
    books = torch.randn(3, 10, 4)  # one stage more than the head reads: it takes the first two
    books[1, 7] = books[1, 2]
    head.set_codebooks(books)
    x = torch.randn(5, 2, 16)
    logits = head(x)
    assert logits.shape == (5, 2, 10)
    assert torch.allclose(logits[:, 1, 7], logits[:, 1, 2])
    assert not torch.allclose(logits[:, 0, 7], logits[:, 0, 2])
    with torch.no_grad():
        head.bias[1, 7] = 0.5
    assert torch.allclose(head(x)[:, 1, 7], logits[:, 1, 2] + 0.5)
    assert torch.allclose(head.stage_logits(x[:, 1], 1), head(x)[:, 1])


def test_each_stage_is_scaled_to_unit_rms_norm():
    head = CodebookHead(width=8, depth=2, codebook_size=6, code_dim=4)
    books = torch.randn(2, 6, 4)
    books[1] *= 0.01  # a residual stage: far shorter vectors
    head.set_codebooks(books)
    rms = head.codebooks.pow(2).sum(-1).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones(2), atol=1e-5)


def test_kept_code_vectors_follow_every_change_of_their_weights():
    torch.manual_seed(2)
    head = CodebookHead(width=8, depth=1, codebook_size=6, code_dim=4).eval()
    head.set_codebooks(torch.randn(1, 6, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = head.stage_logits(x, 0)
        assert head.code_vectors(0) is head.code_vectors(0)  # kept between calls
        head.code_mlp[0][2].weight.add_(0.5)  # an in-place change, as an optimiser or a load makes
        assert torch.allclose(head.stage_logits(x, 0), head.train().stage_logits(x, 0))
        head.eval()
        assert not torch.allclose(head.stage_logits(x, 0), first)
        head.set_codebooks(torch.randn(1, 6, 4))
        assert torch.allclose(head.stage_logits(x, 0), head.train().stage_logits(x, 0))


def test_the_head_needs_codebooks_of_its_shape():
    head = CodebookHead(width=8, depth=2, codebook_size=6, code_dim=4)
    with pytest.raises(RuntimeError, match="attach the image tokenizer"):
        head(torch.randn(1, 2, 8))
    for shape in [(1, 6, 4), (2, 5, 4), (2, 6, 3), (6, 4)]:
        with pytest.raises(ValueError, match="codebooks of shape"):
            head.set_codebooks(torch.randn(*shape))


@pytest.mark.parametrize("head", ["free", "codebook"])
def test_stage_by_stage_logits_equal_the_teacher_forced_ones(head):
    torch.manual_seed(1)
    depth = DepthTransformer(lm_hidden=12, depth=3, codebook_size=20, num_cells=4, width=16, layers=2, heads=2,
                             head=head, code_dim=5, head_width=8).eval()
    if depth.code_head is not None:
        depth.code_head.set_codebooks(torch.randn(3, 20, 5))
    hidden, cells, codes = torch.randn(6, 12), torch.randint(0, 4, (6,)), torch.randint(0, 20, (6, 3))
    with torch.no_grad():
        forced = depth(hidden, cells, codes)
        cached = depth.start(hidden, cells)  # keys and values kept: each stage runs alone
        for j in range(3):
            assert torch.allclose(depth.next_logits(hidden, cells, codes[:, :j]), forced[:, j], atol=1e-5)
            if j:
                cached.feed(codes[:, j - 1])
            assert torch.allclose(cached.logits(), forced[:, j], atol=1e-5)
        with pytest.raises(ValueError, match="already known"):
            cached.feed(codes[:, 2])


def test_unknown_heads_are_refused():
    with pytest.raises(ValueError, match="head must be one of"):
        DepthTransformer(lm_hidden=8, depth=2, codebook_size=4, num_cells=4, width=8, heads=2, head="tied")
    with pytest.raises(ValueError, match="code_dim"):
        DepthTransformer(lm_hidden=8, depth=2, codebook_size=4, num_cells=4, width=8, heads=2, head="codebook")
    with pytest.raises(ValueError, match="depth_head"):
        MLLMConfig(lm_config={"model_type": "qwen2"}, depth_head="tied")


def test_a_codebook_head_model_trains_saves_and_loads(image_tok, text_tok, tmp_path):  # noqa: F811
    image_tok.save_pretrained(tmp_path / "tokenizer")
    model = build(image_tok, text_tok, seed=3, path="tokenizer", depth_head="codebook", depth_head_width=16)
    head = model.depth.code_head
    assert model.depth.head_weight is None and head is not None
    stages = image_tok.quantizer.embed[: model.config.pixel_depth]
    rms = stages.pow(2).sum(-1).mean(-1).sqrt()
    assert torch.allclose(head.codebooks, stages / rms[:, None, None])  # the tokenizer's own vectors

    batch = tensors(random_batch(model, seed=2))
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and head.query.grad is not None and head.code_mlp[0][0].weight.grad is not None
    model.eval()

    model.save_pretrained(tmp_path / "mllm")
    with safe_open(str(tmp_path / "mllm" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("code_head.query" in k for k in keys) and not any("codebooks" in k for k in keys)
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "mllm")
    assert loaded.config.depth_head == "codebook" and loaded.config.depth_head_width == 16
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, loaded(**batch).loss)
    assert torch.equal(model.generate_image("a red circle", seed=4), loaded.generate_image("a red circle", seed=4))


def test_a_trained_model_switches_to_the_codebook_head(image_tok, text_tok, tmp_path):  # noqa: F811
    model = build(image_tok, text_tok, seed=4)
    free_params = sum(p.numel() for p in model.parameters())
    model.use_codebook_head(head_width=8)
    assert model.config.depth_head == "codebook" and model.config.depth_head_width == 8
    assert model.depth.head_weight is None and model.depth.head_bias is None
    assert not any(name.startswith("depth.head_") for name, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) != free_params
    assert model.depth.code_head.codebooks_set  # filled from the attached tokenizer at once
    with pytest.raises(ValueError, match="already has the codebook head"):
        model.use_codebook_head()
    codes = model.generate_image("a red circle", seed=1)
    assert codes.shape == (1, model.config.grid_size, model.config.grid_size, model.config.pixel_depth)
    model.save_pretrained(tmp_path / "m")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert torch.equal(loaded.generate_image("a red circle", seed=1), codes)

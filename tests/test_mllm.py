"""The multimodal model on tiny random parts: chat template, splicing, sampling, guidance, KV cache,
prompts, saving and loading."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evotok import EvoTok, small_config
from evotok.hub import CheckpointError
from evotok.images import pil_to_tensor
from evotok.mllm import (EmptyPromptError, EvoTokMLLM, PromptTooLongError, TextTokenizer, encode_chat,
                         encode_generation, qwen2_lm_config, render_chat)
from evotok.mllm.chat import IGNORE
from evotok.mllm.data import ChatDataset, ImagePool, collate, corpus_texts
from evotok.mllm.generate import LogitMix, generate_image_codes, sample_logits

CORPUS = [
    "a red circle", "a blue square above a green star", "two yellow triangles", "a photo of a white cross",
    "What colour is the star?", "How many circles are there?", "Is the circle left or right of the square?",
    "red", "blue", "green", "two", "left", "yes",
]


def tiny_tokenizer(seed: int = 0) -> EvoTok:
    """32 px, 4×4 grid, 4 stages × 64 codes, codebooks initialised from one forward pass."""
    torch.manual_seed(seed)
    config = small_config(image_size=32, channels=(16, 32, 32, 32), norm_num_groups=8, num_stages=4,
                          codebook_size=64, code_dim=8, pixel_depth=2, semantic_depth=4, semantic_layers=1,
                          semantic_width=32, semantic_heads=2, teacher_dim=24, teacher=None)
    tok = EvoTok(config)
    tok.train()
    with torch.no_grad():
        tok(torch.rand(16, 3, 32, 32) * 2 - 1)
    return tok.eval()


@pytest.fixture(scope="module")
def image_tok():
    return tiny_tokenizer()


def tiny_text_tokenizer() -> TextTokenizer:
    """A byte-level BPE of 400 tokens on ``CORPUS``."""
    records = [{"caption": c, "label": None, "qa": []} for c in CORPUS]
    pool = ImagePool("scenes", np.zeros((len(records), 4, 4, 4), np.int16), records, {})
    return TextTokenizer.train(corpus_texts({"scenes": pool}), vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def text_tok():
    return tiny_text_tokenizer()


def build(image_tok, text_tok, seed: int = 0, path: str = "tiny-tokenizer", **overrides) -> EvoTokMLLM:
    torch.manual_seed(seed)
    lm = qwen2_lm_config(len(text_tok), hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    options = dict(depth_width=32, depth_heads=2, depth_layers=1, max_prompt_tokens=24)
    options.update(overrides)
    return EvoTokMLLM.build(image_tok, text_tok, image_tokenizer_path=path, lm_config=lm, **options).eval()


@pytest.fixture(scope="module")
def model(image_tok, text_tok):
    return build(image_tok, text_tok)


def random_batch(model, count: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    records = [{"caption": "a red circle", "label": None,
                "qa": [["What colour is the circle?", "red"], ["How many circles are there?", "one"]]}] * 8
    codes = rng.integers(0, model.config.codebook_size, size=(8, 4, 4, 4)).astype(np.int16)
    data = ChatDataset({"scenes": ImagePool("scenes", codes, records, {})},
                       {"scene_t2i": 1.0, "scene_qa": 1.0, "text": 0.3}, model.text, model.config.num_cells,
                       model.config.pixel_depth, seed=seed)
    return collate([data[i] for i in range(count)], model.text.ids["pad"])


def tensors(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "tasks"}


# ---------------------------------------------------------------------------- template and splice
def test_chat_template_places_one_image_embedding_per_cell_and_supervises_only_answers(model):
    tok, n = model.text, model.config.num_cells
    turns = [("What colour is the star?", "red"), ("How many circles are there?", "two")]
    enc = encode_chat(tok, turns, num_image_tokens=n)
    ids = torch.tensor(enc.input_ids)
    assert int((ids == tok.ids["image"]).sum()) == n == sum(enc.image_mask)
    assert enc.input_ids[0] == tok.ids["user"] and enc.input_ids[1] == tok.ids["image"]
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]
    assert supervised == tok.encode("red") + [tok.ids["end"]] + tok.encode("two") + [tok.ids["end"]]
    assert render_chat(turns, n).startswith(f"<|user|><image>×{n}What colour")

    features = torch.randn(1, n, model.config.semantic_dim)
    with torch.no_grad():
        embeds = model.embed_inputs(ids[None], torch.tensor([enc.image_mask]), features)
        plain = model.lm.get_input_embeddings()(ids[None])
        expected = model.projector(features) + model.grid_pos
    mask = torch.tensor(enc.image_mask)
    assert torch.allclose(embeds[0, mask], expected[0])
    assert torch.equal(embeds[0, ~mask], plain[0, ~mask])
    with pytest.raises(ValueError, match="placeholders"):
        model.embed_inputs(ids[None], torch.tensor([enc.image_mask]), features[:, :-1])


def test_generation_sequence_has_the_grid_between_boi_and_eoi(model):
    tok, n = model.text, model.config.num_cells
    enc = encode_generation(tok, "a red circle", n)
    cells = [i for i, g in enumerate(enc.gen_mask) if g]
    assert len(cells) == n and cells == list(range(cells[0], cells[0] + n))
    assert enc.input_ids[cells[0] - 1] == tok.ids["boi"] and enc.input_ids[cells[-1] + 1] == tok.ids["eoi"]
    assert all(lab == IGNORE for lab in enc.labels)
    uncond = encode_generation(tok, "   ", n, include_grid=False)
    assert uncond.input_ids == [tok.ids[k] for k in ("user", "end", "assistant", "boi")]


def test_mixed_batch_reports_both_losses_and_text_only_samples_work(model):
    batch = random_batch(model)
    assert {"scene_t2i", "scene_qa"} <= set(batch["tasks"])
    out = model(**tensors(batch))
    assert out.depth_positions == batch["gen_codes"].shape[0] * model.config.num_cells
    assert out.lm_tokens > 0 and out.depth_loss_per_stage.shape == (model.config.pixel_depth,)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.lm_loss + out.depth_loss)

    text_only = encode_chat(model.text, [("What shapes do you know?", "circle and square")])
    item = {"task": "text", "input_ids": text_only.input_ids, "labels": text_only.labels,
            "image_mask": text_only.image_mask, "gen_mask": text_only.gen_mask, "image_codes": None, "gen_codes": None}
    out = model(**tensors(collate([item], model.text.ids["pad"])))
    assert out.depth_positions == 0 and out.lm_tokens == len(model.text.encode("circle and square")) + 1
    assert torch.isfinite(out.lm_loss)


# ---------------------------------------------------------------------------- sampling
def test_fixed_seed_reproduces_an_image_and_seeds_differ(model):
    a = model.generate_image("a red circle", seed=7)
    b = model.generate_image("a red circle", seed=7)
    c = model.generate_image("a red circle", seed=8)
    g = model.config.grid_size
    assert a.shape == (1, g, g, model.config.pixel_depth)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.decode_codes(a).shape == (1, 3, 32, 32)
    stages = model.decode_stages(a)
    assert stages.shape == (model.config.pixel_depth, 1, 3, 32, 32)
    assert torch.allclose(stages[-1], model.decode_codes(a), atol=1e-5)


def test_guidance_scale_one_equals_the_conditional_branch(model):
    trace_guided, trace_cond = [], []
    guided = generate_image_codes(model, ["a red circle"], guidance_scale=1.0, seed=3, logits_trace=trace_guided)
    cond = generate_image_codes(model, ["a red circle"], guidance_scale=None, seed=3, logits_trace=trace_cond)
    assert torch.equal(guided, cond)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(trace_guided, trace_cond))
    trace_strong = []
    generate_image_codes(model, ["a red circle"], guidance_scale=3.0, seed=3, logits_trace=trace_strong)
    assert not torch.allclose(trace_strong[0], trace_cond[0], atol=1e-4)


def test_branch_trace_holds_each_branch_log_probability_of_the_drawn_codes(model):
    traced, logits = [], []
    codes = generate_image_codes(model, ["a red circle", "two blue squares"], guidance_scale=1.0, seed=3,
                                 logits_trace=logits, branch_trace=traced)
    assert torch.equal(codes, generate_image_codes(model, ["a red circle", "two blue squares"], guidance_scale=1.0,
                                                   seed=3))  # tracing draws the same codes
    cells, depth = model.config.num_cells, model.config.pixel_depth
    (trace,) = traced
    assert trace.shape == (4, cells, depth)  # two prompts' conditional rows, then their unconditional ones
    assert (trace <= 0).all()
    # at scale 1 the mixed logits are the conditional branch's own: its rows are their log-softmax at each drawn code
    drawn = codes.view(2, cells, depth)
    steps = torch.stack(logits).view(cells, depth, 2, -1).log_softmax(-1)
    expected = steps.gather(-1, drawn.permute(1, 2, 0)[..., None])[..., 0].permute(2, 0, 1)
    assert torch.allclose(trace[:2], expected, atol=1e-5)
    assert not torch.allclose(trace[2:], trace[:2], atol=1e-3)


def test_logit_mix_adds_each_attribute_branch_to_the_guided_logits():
    c, s, k, u = (torch.full((2, 3), v) for v in (5.0, 2.0, 1.0, 0.5))
    logits = torch.cat([c, s, k, u])
    assert LogitMix(2, None).branches == 1 and LogitMix(2, 3.0).branches == 2
    mix = LogitMix(2, 3.0, 0.5)
    assert mix.branches == 4
    assert torch.allclose(mix(logits), u + 3.0 * (c - u) + 0.5 * ((s - u) + (k - u)))
    assert torch.allclose(LogitMix(2, 3.0)(torch.cat([c, u])), u + 3.0 * (c - u))


def test_attribute_guidance_pulls_only_where_the_prompt_names_a_coloured_shape(model):
    def trace(prompt, **kwargs):
        out = []
        generate_image_codes(model, [prompt], guidance_scale=3.0, seed=3, logits_trace=out, **kwargs)
        return torch.stack(out)

    plain = trace("a red circle")
    assert torch.allclose(trace("a red circle", attribute_guidance=0.0), plain, atol=1e-4)
    assert not torch.allclose(trace("a red circle", attribute_guidance=2.0)[0], plain[0], atol=1e-3)
    # no coloured shape in the prompt: the extra branches are the empty prompt and pull nowhere
    assert torch.allclose(trace("two", attribute_guidance=2.0), trace("two"), atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.generate_image("a red circle", guidance_scale=None, attribute_guidance=1.0)
    with pytest.raises(ValueError, match="attribute_guidance"):
        model.generate_image("a red circle", attribute_guidance=-1.0)


def test_kv_cached_generation_equals_uncached(model):
    prompts = ["a red circle", "two yellow triangles above a blue square"]  # different lengths: left padding
    cached = model.generate_image(prompts, guidance_scale=2.0, seed=11, use_cache=True)
    uncached = model.generate_image(prompts, guidance_scale=2.0, seed=11, use_cache=False)
    assert torch.equal(cached, uncached)
    image = torch.rand(3, 32, 32) * 2 - 1
    question = "What colour is the star?"
    assert (model.answer(image, question, stream=False, max_new_tokens=6, use_cache=True)
            == model.answer(image, question, stream=False, max_new_tokens=6, use_cache=False))


def test_batch_of_prompts_matches_single_prompts(model):
    prompts = ["a red circle", "two yellow triangles above a blue square"]
    both = model.generate_image(prompts, guidance_scale=None, temperature=0)
    for i, prompt in enumerate(prompts):
        assert torch.equal(both[i], model.generate_image(prompt, guidance_scale=None, temperature=0)[0])


def test_row_callback_sees_the_grid_fill_up(model):
    seen, threads = [], []
    before = torch.get_num_threads()

    def callback(rows, codes):
        seen.append((rows, codes))
        threads.append(torch.get_num_threads())

    codes = model.generate_image("a red circle", seed=0, callback=callback)
    g = model.config.grid_size
    assert [rows for rows, _ in seen] == list(range(1, g + 1))
    rows, partial = seen[1]
    assert torch.equal(partial[:, :rows], codes[:, :rows]) and not partial[:, rows:].any()
    assert set(threads) == {1} and torch.get_num_threads() == before  # small LM decodes single-threaded
    model.generate_image("a red circle", seed=0, callback=callback, cpu_threads=before)
    assert threads[-1] == before


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 5)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_logits(logits, temperature=0), torch.ones(5, dtype=torch.long))
    assert torch.equal(sample_logits(logits, 1.0, top_k=1, generator=gen), torch.ones(5, dtype=torch.long))
    assert torch.equal(sample_logits(logits, 1.0, top_p=0.01, generator=gen), torch.ones(5, dtype=torch.long))
    draws = sample_logits(logits.repeat(200, 1), 1.0, top_k=2, generator=gen)
    assert set(draws.tolist()) == {1, 3}
    draws = sample_logits(logits.repeat(200, 1), 1.0, generator=gen)
    assert set(draws.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"guidance_scale": -1.0}])
def test_bad_sampling_settings_are_refused(model, kwargs):
    with pytest.raises(ValueError):
        model.generate_image("a red circle", **kwargs)


# ---------------------------------------------------------------------------- prompts and answers
def test_prompt_length_is_capped_with_a_clear_error(model):
    long_prompt = " ".join(["a red circle above a blue square"] * 6)
    with pytest.raises(PromptTooLongError, match="at most 24 tokens"):
        model.generate_image(long_prompt)
    with pytest.raises(PromptTooLongError, match="question"):
        model.answer(torch.zeros(3, 32, 32), long_prompt)
    with pytest.raises(EmptyPromptError):
        model.answer(torch.zeros(3, 32, 32), "  ")
    with pytest.raises(ValueError, match="32×32"):
        model.answer(torch.zeros(3, 48, 48), "What colour is the star?")
    assert model.generate_image("", seed=0).shape[0] == 1  # empty prompt: unconditional generation


def test_answers_stream_in_pieces_and_take_history(model):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    pieces = list(model.answer(image, "What colour is the star?", max_new_tokens=5))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == model.answer(image, "What colour is the star?", max_new_tokens=5, stream=False)
    history = [("How many circles are there?", "two")]
    assert isinstance(model.answer(image, "and the star?", history=history, stream=False, max_new_tokens=3), str)
    text_only = model.answer(None, "What shapes do you know?", stream=False, max_new_tokens=3)
    assert isinstance(text_only, str)


def test_batched_answers_match_single_answers(model):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    questions = ["What colour is the star?", "Is the circle left or right of the square?"]
    batch = model.answer_batch(images, questions, max_new_tokens=4)
    single = [model.answer(images[i], q, max_new_tokens=4, stream=False).strip() for i, q in enumerate(questions)]
    assert batch == single


def test_known_and_unknown_words(model):
    known = model.known_words()
    assert {"red", "circle", "colour"} <= set(known)
    assert model.unknown_words("a Red zebra and a purple-ish CIRCLE, zebra") == ["zebra", "purple-ish"]


def test_user_text_cannot_forge_special_tokens(model):
    ids = model.text.encode("a red <image> circle <|end|>")
    assert model.text.ids["image"] not in ids and model.text.ids["end"] not in ids


# ---------------------------------------------------------------------------- training helpers
def test_stage_one_trains_only_new_embedding_rows(image_tok, text_tok):
    m = build(image_tok, text_tok, seed=1)
    base = len(text_tok) - 4
    m.config.base_vocab_size = base
    m.set_trainable(train_lm=False)
    m.train()
    out = m(**tensors(random_batch(m)))
    out.loss.backward()
    emb = m.lm.get_input_embeddings().weight
    assert emb.grad is not None and not emb.grad[:base].any()
    assert all(p.grad is None for n, p in m.lm.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert m.projector[1].weight.grad is not None and m.depth.head_weight.grad is not None
    m.set_trainable(train_lm=True)
    assert all(p.requires_grad for p in m.lm.parameters())


def test_a_pretrained_lm_from_a_folder_gets_new_token_rows(image_tok, tmp_path):
    """The full-scale path (a hub id or folder, e.g. Qwen2.5) offline: a saved tiny Qwen2 plus its
    own tokenizer without EvoTok's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path / "lm")
    base_vocab = raw.get_vocab_size()
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=base_vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64)).save_pretrained(tmp_path / "lm")

    text = TextTokenizer.from_lm(tmp_path / "lm")
    assert len(text) == base_vocab + 8
    m = EvoTokMLLM.build(image_tok, text, image_tokenizer_path="tiny", lm_name_or_path=str(tmp_path / "lm"),
                         depth_width=32, depth_heads=2, depth_layers=1)
    assert m.config.base_vocab_size == base_vocab
    assert m.lm.get_input_embeddings().num_embeddings >= len(text)
    m.set_trainable(train_lm=False)
    m(**tensors(random_batch(m))).loss.backward()
    for table in (m.lm.get_input_embeddings(), m.lm.get_output_embeddings()):  # untied: both learn new rows
        assert not table.weight.grad[:base_vocab].any() and table.weight.grad[base_vocab:].any()
    assert all(p.grad is None for n, p in m.lm.named_parameters() if "embed" not in n and "lm_head" not in n)
    m.save_pretrained(tmp_path / "saved")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "saved", image_tokenizer=image_tok)
    assert torch.equal(loaded.generate_image("a red circle", seed=0), m.eval().generate_image("a red circle", seed=0))
    m.save_pretrained(tmp_path / "sharded", max_shard_size=200_000)  # as a full-scale LM is saved: in shards
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    sharded = EvoTokMLLM.from_pretrained(tmp_path / "sharded", image_tokenizer=image_tok)
    assert len(sharded.text) == len(text)
    assert torch.equal(sharded.generate_image("a red circle", seed=0), m.generate_image("a red circle", seed=0))


def test_image_pools_are_encoded_once_in_chunks_and_skip_unreadable_images(image_tok, tmp_path):
    from PIL import Image

    from evotok.data.base import Sample
    from evotok.images import ImageError
    from evotok.mllm.data import build_pool, load_pool, pool_is_complete

    class Source:
        split, seed, reads = "train", 0, 0

        def __len__(self):
            return 5

        def __getitem__(self, i):
            self.reads += 1
            if i == 3:
                raise ImageError("unreadable")
            return Sample(Image.new("RGB", (40, 40), (50 * i, 0, 0)), f"caption {i}", "scenes", qa=[("q", f"a{i}")])

    source = Source()
    with pytest.warns(UserWarning, match="left out"):
        pool = build_pool(tmp_path / "pool", "scenes", source, 5, 32, image_tok, chunk_size=2)
    assert len(pool) == 4 and pool.codes.shape == (4, 4, 4, 4)
    assert [r["caption"] for r in pool.records] == ["caption 0", "caption 1", "caption 2", "caption 4"]
    assert torch.equal(torch.from_numpy(pool.codes[1].astype(np.int64)),
                       image_tok.encode(pil_to_tensor(source[1].image, 32)[None])[0])
    reads = source.reads
    again = build_pool(tmp_path / "pool", "scenes", source, 5, 32, image_tok, chunk_size=2)
    assert source.reads == reads and np.array_equal(again.codes, load_pool(tmp_path / "pool").codes)
    with pytest.raises(ValueError, match="different pool"):
        build_pool(tmp_path / "pool", "scenes", source, 4, 32, image_tok, chunk_size=2)
    assert pool_is_complete(tmp_path / "pool") and not pool_is_complete(tmp_path / "nothing")
    (tmp_path / "pool" / "chunk_00001.npz").unlink()
    assert not pool_is_complete(tmp_path / "pool")


def test_pool_rendered_by_forked_workers_equals_the_serial_pool(image_tok, tmp_path):
    from evotok.data.mixture import build_sources
    from evotok.mllm.data import build_pool

    source = build_sources(["scenes"], resolution=32, seed=3, split="train")["scenes"]
    serial = build_pool(tmp_path / "serial", "scenes", source, 7, 32, image_tok, chunk_size=4)
    forked = build_pool(tmp_path / "forked", "scenes", source, 7, 32, image_tok, chunk_size=4, workers=3)
    assert len(forked) == 7 and np.array_equal(forked.codes, serial.codes)
    assert forked.records == serial.records


# ---------------------------------------------------------------------------- saving
def test_save_load_round_trip(image_tok, text_tok, tmp_path):
    image_tok.save_pretrained(tmp_path / "tokenizer")
    model = build(image_tok, text_tok, seed=2, path="tokenizer")  # relative: found beside the model folder
    model.save_pretrained(tmp_path / "mllm")
    saved = json.loads((tmp_path / "mllm" / "config.json").read_text())
    assert saved["image_tokenizer"] == "tokenizer" and saved["image_tokenizer_sha256"]

    loaded = EvoTokMLLM.from_pretrained(tmp_path / "mllm")
    assert loaded.text.known_words() == model.text.known_words()
    batch = tensors(random_batch(model, seed=1))
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, loaded(**batch).loss)
    assert torch.equal(model.generate_image("a red circle", seed=5), loaded.generate_image("a red circle", seed=5))

    with pytest.raises(CheckpointError, match="differ"):
        EvoTokMLLM.from_pretrained(tmp_path / "mllm", image_tokenizer=tiny_tokenizer(seed=1))
    assert EvoTokMLLM.from_pretrained(tmp_path / "mllm", image_tokenizer=tiny_tokenizer(seed=1),
                                      check_image_tokenizer=False) is not None
    (tmp_path / "mllm" / "config.json").write_text(json.dumps({**saved, "depth_width": 64}))
    with pytest.raises(CheckpointError, match="wrong shape"):
        EvoTokMLLM.from_pretrained(tmp_path / "mllm")
    with pytest.raises(CheckpointError, match="evotok_mllm"):
        EvoTokMLLM.from_pretrained(tmp_path / "tokenizer")


def test_projector_context_starts_as_a_no_op_then_mixes_neighbouring_cells(image_tok, text_tok, tmp_path):
    model = build(image_tok, text_tok)
    n, g = model.config.num_cells, model.config.grid_size
    features = torch.randn(1, n, model.config.semantic_dim)
    with torch.no_grad():
        before = model.project_image(features)
        model.add_projector_context(1)
        assert torch.equal(model.project_image(features), before)  # zero-initialised output layer
        with pytest.raises(ValueError, match="already has"):
            model.add_projector_context(1)
        torch.nn.init.normal_(model.projector_context.out.weight)
        changed = features.clone()
        changed[0, 0] += 1.0  # cell (0, 0): only it and its 3×3 neighbours may move with one convolution
        moved = (model.project_image(changed) - model.project_image(features)).abs().amax(dim=-1)[0].view(g, g)
    assert bool((moved[:2, :2] > 0).all())
    assert float(moved[2:].max()) == 0.0 and float(moved[:, 2:].max()) == 0.0
    model.save_pretrained(tmp_path / "m")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert loaded.config.projector_context_layers == 1
    with torch.no_grad():
        assert torch.equal(loaded.project_image(features), model.project_image(features))
    with pytest.raises(ValueError, match="projector_context_layers"):
        build(image_tok, text_tok, projector_context_layers=-1)


def test_grid_axes_start_as_a_no_op_then_shift_whole_rows_and_columns(image_tok, text_tok, tmp_path):
    model = build(image_tok, text_tok)
    g = model.config.grid_size
    with torch.no_grad():
        before = model.cell_positions().clone()
        model.add_grid_axes()
        assert torch.equal(model.cell_positions(), before)  # zero-initialised
        with pytest.raises(ValueError, match="already has"):
            model.add_grid_axes()
        model.grid_rows[1] += 1.0
        model.grid_cols[0, 2] += 2.0
        shift = (model.cell_positions() - before).mean(dim=-1).view(g, g)
    expected = torch.zeros(g, g)
    expected[1] += 1.0
    expected[:, 2] += 2.0
    assert torch.allclose(shift, expected)

    # chat and generation both read cell_positions(): the same sums folded into grid_pos alone
    # give the same answers and images
    folded = build(image_tok, text_tok)
    with torch.no_grad():
        folded.grid_pos.copy_(model.cell_positions())
    image = torch.rand(3, 32, 32) * 2 - 1
    answers = [m.answer(image, "What colour is the star?", stream=False, max_new_tokens=6) for m in (model, folded)]
    assert answers[0] == answers[1]
    assert torch.equal(model.generate_image("a red circle", guidance_scale=2.0, seed=5),
                       folded.generate_image("a red circle", guidance_scale=2.0, seed=5))
    with torch.no_grad():
        model.grid_cols.normal_()
    assert not torch.equal(model.generate_image("a red circle", guidance_scale=2.0, seed=5),
                           folded.generate_image("a red circle", guidance_scale=2.0, seed=5))

    model.save_pretrained(tmp_path / "m")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert loaded.config.grid_axis_embeddings
    assert torch.equal(loaded.cell_positions(), model.cell_positions())


def test_grid_axes_can_start_as_an_ordered_pattern_of_a_given_norm(image_tok, text_tok):
    model = build(image_tok, text_tok)
    g = model.config.grid_size
    with torch.no_grad():
        model.add_grid_axes(init_norm=3.0)
        added = (model.cell_positions() - model.grid_pos).view(g, g, -1)
    assert float(added.norm(dim=-1).mean()) == pytest.approx(3.0, rel=0.1)
    assert torch.allclose(added.mean(dim=(0, 1)), torch.zeros(added.shape[-1]), atol=1e-5)  # centred
    # rows and columns live in separate channels; neighbours are closer than far cells
    half = model.config.hidden_size // 2
    assert float(added[0, :, half:].std(dim=0).max()) > 0 and float(added[:, 0, :half].std(dim=0).max()) > 0
    assert float(added[:, 0, half:].std(dim=0).max()) < 1e-6  # a column's cells share the column half
    rows = added[:, 0, :half]
    assert float((rows[0] - rows[1]).norm()) < float((rows[0] - rows[-1]).norm())
    with pytest.raises(ValueError, match="init_norm"):
        build(image_tok, text_tok).add_grid_axes(init_norm=-1.0)


# ---------------------------------------------------------------------------- co-occurrence gaps
def test_gap_answers_name_only_partners_never_seen_in_training():
    from evotok.data.scenes import COLOURS, HELDOUT_PAIRS, SHAPES, TRAIN_PAIRS
    from evotok.mllm.answer_gaps import gap_answers

    pairs = {("red", "circle"), ("red", "square"), ("blue", "star"), ("red", "cross")}
    assert gap_answers("What shape is the red object?", "circle", pairs=pairs) == ["hexagon", "star", "triangle"]
    assert "red" in gap_answers("What colour is the star?", "blue", pairs=pairs)
    assert "blue" not in gap_answers("What colour is the star?", "blue", pairs=pairs)  # never the answer itself
    # no colour in the question: the single colour of the caption is the object's
    assert gap_answers("What shape is the object?", "circle", "a small red circle", pairs) == ["hexagon", "star", "triangle"]
    assert gap_answers("What shape is the object?", "circle", "a red circle and a blue star", pairs) == []
    assert gap_answers("How many stars are there?", "two", pairs=pairs) == []
    # by default the gaps are exactly the held-out partners
    for colour in COLOURS:
        seen = next(s for s in SHAPES if (colour, s) in TRAIN_PAIRS)
        assert gap_answers(f"What shape is the {colour} object?", seen) == sorted(s for c, s in HELDOUT_PAIRS if c == colour)


def test_excluded_answer_tokens_leave_the_softmax(model, monkeypatch):
    tok = model.text
    records = [{"caption": "a red circle", "label": None,
                "qa": [["What shape is the red object?", "circle"], ["What colour is the circle?", "red"]]}] * 4
    codes = np.random.default_rng(0).integers(0, model.config.codebook_size, size=(4, 4, 4, 4)).astype(np.int16)
    pools = {"scenes": ImagePool("scenes", codes, records, {})}
    pairs_seen = {("red", "circle"), ("blue", "circle")}  # every other colour and shape is a gap here
    import evotok.mllm.data as data_module
    from evotok.mllm.answer_gaps import gap_answers

    monkeypatch.setattr(data_module, "gap_answers", lambda q, a, caption="": gap_answers(q, a, caption, pairs_seen))
    data = ChatDataset(pools, {"scene_qa": 1.0}, tok, model.config.num_cells, model.config.pixel_depth,
                       max_turns=2, mask_answer_gaps=True)
    items = [data[i] for i in range(4)]
    for item in items:
        assert item["exclusions"]
        for position, token in item["exclusions"]:
            assert item["labels"][position] != IGNORE and item["labels"][position] != token
    batch = collate(items, tok.ids["pad"])
    assert batch["answer_exclusions"].shape == (sum(len(it["exclusions"]) for it in items), 3)
    with torch.no_grad():
        plain = model(**tensors({**batch, "answer_exclusions": None}))
        masked = model(**tensors(batch))
        # by hand: the same cross-entropy with the excluded logits removed
        embeds = model.embed_inputs(batch["input_ids"], batch["image_mask"], model.image_features(batch["image_codes"]))
        hidden, _ = model.backbone(embeds, batch["attention_mask"])
        logits = model.text_logits(hidden[:, :-1]).float()
        for row, position, token in batch["answer_exclusions"].tolist():
            logits[row, position - 1, token] = float("-inf")
        targets = batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits[targets != IGNORE], targets[targets != IGNORE])
    assert masked.lm_loss < plain.lm_loss
    assert torch.allclose(masked.lm_loss, expected, atol=1e-5)
    with pytest.raises(ValueError, match="supervised"):
        model(**tensors({**batch, "answer_exclusions": torch.tensor([[0, 1, 5]])}))


def test_caption_answers_mask_the_never_seen_shapes_after_each_colour_word():
    from pathlib import Path

    bundled = TextTokenizer.load(Path(__file__).resolve().parents[1] / "assets" / "mllm" / "text_tokenizer")
    pool = ImagePool("scenes", np.zeros((1, 8, 8, 4), np.int16), [{"caption": "", "label": None, "qa": []}], {})
    data = ChatDataset({"scenes": pool}, {"scene_qa": 1.0}, bundled, 64, 4, mask_caption_gaps=True)
    caption = "two red circles and a yellow square"  # red is never a star, yellow never a circle
    excluded = data.answer_exclusions([("Describe the image.", caption)], [0], caption)
    pieces = [bundled.decode([i]) for i in bundled.encode(caption)]
    assert {(pieces[p], bundled.decode([t])) for p, t in excluded} == {(" circles", " stars"), (" square", " circle")}

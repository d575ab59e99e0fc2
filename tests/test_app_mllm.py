"""The "Text to image" and "Ask about an image" tabs end to end, through gradio_client, on the app
process that ``test_app.py`` starts (the bundled multimodal model, or a random stand-in of its shape
when ``assets/mllm`` is missing); plus the start-up policy of ``--mllm``."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evotok.mllm.layout_plan import parse_plan
from test_app import BUNDLED, BUNDLED_MLLM, OFFLINE_ENV, ROOT, free_port, shared_app

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
TRAINED = (BUNDLED / "config.json").is_file() and (BUNDLED_MLLM / "config.json").is_file()


@pytest.fixture(scope="module")
def app(tmp_path_factory, request):
    url, proc, log = shared_app(tmp_path_factory, request)
    yield Client(url, verbose=False), proc, log


@pytest.fixture(scope="module")
def scene() -> str:
    path = EXAMPLES / "scene_colours.png"
    if not path.is_file():
        pytest.skip("assets/examples/scene_colours.png is missing")
    return str(path)


def generate(client: Client, prompt: str, seed: int = 7, **settings):
    values = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 0, **settings}
    return client.predict(prompt, values["guidance_scale"], values["temperature"], values["top_k"], seed,
                          api_name="/generate")


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)


# --------------------------------------------------------------------------- endpoints
def test_generate_and_ask_endpoints_are_public(app):
    client, _, _ = app
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == [
        "prompt", "guidance_scale", "temperature", "top_k", "seed", "candidates"]
    defaults = {p["parameter_name"]: p.get("parameter_default") for p in api["/generate"]["parameters"]}
    assert defaults["guidance_scale"] == 3.0 and defaults["temperature"] == 0.8 and defaults["candidates"] == 16
    assert [p["parameter_name"] for p in api["/ask"]["parameters"]] == ["image", "question", "history"]
    assert len(api["/generate"]["returns"]) == 3 and len(api["/ask"]["returns"]) == 3


def test_a_fixed_seed_gives_the_same_image_and_unknown_words_are_flagged(app):
    client, _, _ = app
    image, gallery, note = generate(client, "a red zorblax circle", seed=7)
    image2, _, note2 = generate(client, "a red zorblax circle", seed=7)
    first = pixels(image)
    assert np.array_equal(first, pixels(image2))
    assert "seed **7**" in note and "zorblax" in note and "Unknown words" in note
    # nearest-neighbour display: every generated pixel is a k×k block
    match = re.search(r"shown (\d+)× enlarged with nearest-neighbour", note)
    assert match, note
    k = int(match.group(1))
    assert np.array_equal(first, first[::k, ::k].repeat(k, 0).repeat(k, 1))
    captions = [item["caption"] for item in gallery]
    depth = len(captions)
    assert depth >= 2 and captions == [f"after stage {d} of {depth}" for d in range(1, depth + 1)]
    assert np.array_equal(pixels(gallery[-1]["image"]), first)


def test_candidates_keep_the_models_own_pick(app):
    client, _, _ = app
    image, gallery, note = client.predict("a red circle", 3.0, 1.0, 0, 7, 2, api_name="/generate")
    assert Path(image).is_file() and "Best of 2 candidates" in note and "kept candidate" in note


@pytest.mark.skipif(not TRAINED, reason="needs the bundled checkpoints")
def test_the_bundled_model_shows_the_layout_plan_it_wrote(app):
    """The bundled model writes a plan before drawing; the note shows it, and it names what was asked."""
    client, _, _ = app
    _, _, note = generate(client, "a red circle", seed=5)
    match = re.search(r"\*\*Layout plan\*\*[^`]*`([^`]*)`", note)
    assert match, note
    plan = parse_plan(match.group(1), grid=8)
    assert plan is not None and [(entry.colour, entry.shape) for entry in plan] == [("red", "circle")], plan


def test_an_empty_prompt_draws_an_unconditional_sample(app):
    client, _, _ = app
    image, gallery, note = generate(client, "   ", seed=3)
    assert Path(image).is_file() and len(gallery) >= 2 and "unconditional" in note


@pytest.mark.parametrize("prompt, message", [
    (" ".join(["a red circle above a blue square"] * 8), r"at most \d+ tokens"),
    ("x" * 2000, "characters"),
], ids=["tokens", "characters"])
def test_too_long_prompts_get_a_clear_error_and_the_app_stays_up(app, prompt, message):
    client, proc, _ = app
    with pytest.raises(AppError, match=message) as info:
        generate(client, prompt)
    assert "Traceback" not in str(info.value)
    assert proc.poll() is None
    assert client.predict(api_name="/codebook")[0]["type"] == "plotly"  # still answering


def test_ask_answers_about_an_example_image_and_keeps_the_conversation(app, scene):
    client, _, _ = app
    chat, answer, note = client.predict(handle_file(scene), "What colour is the star?", api_name="/ask")
    assert isinstance(answer, str) and answer.strip()
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert text_of(chat[0]) == "What colour is the star?" and text_of(chat[1]).strip() == answer
    assert "Answered in" in note and "**Input:**" in note
    if TRAINED:  # the bundled model answers a colour question with a colour (its accuracy: bench_mllm.py)
        from evotok.data.scenes import COLOURS

        assert answer.strip().lower() in COLOURS
    chat2, answer2, _ = client.predict(handle_file(scene), "How many stars are there?", chat, api_name="/ask")
    assert [m["role"] for m in chat2] == ["user", "assistant"] * 2
    assert text_of(chat2[0]) == "What colour is the star?" and text_of(chat2[2]) == "How many stars are there?"
    assert text_of(chat2[3]).strip() == answer2


@pytest.mark.parametrize("kind, question, message", [
    ("none", "What colour is the star?", "Upload an image first"),
    ("scene", "   ", "question is empty"),
    ("scene", " ".join(["What colour is the star?"] * 12), r"at most \d+ tokens"),
    ("text", "What colour is the star?", "not an image format"),
])
def test_bad_questions_and_images_get_a_clear_error(app, scene, tmp_path, kind, question, message):
    client, proc, _ = app
    image = {"none": None, "scene": scene}.get(kind)
    if kind == "text":
        image = str(tmp_path / "notes.txt")
        Path(image).write_text("this is a text file, not an image")
    with pytest.raises(AppError, match=message) as info:
        client.predict(handle_file(image) if image else None, question, api_name="/ask")
    assert "Traceback" not in str(info.value)
    assert proc.poll() is None


def test_the_note_words_every_judge():
    from app.multimodal_callbacks import JUDGE_NOTES
    from evotok.mllm.rerank import JUDGES

    assert set(JUDGE_NOTES) == set(JUDGES)
    for note in JUDGE_NOTES.values():
        assert note.format(scores="-1.00, -2.00").endswith("-1.00, -2.00")


def test_chat_history_helpers():
    from app.multimodal_callbacks import history_pairs, messages_of

    gradio_style = [{"role": "user", "content": [{"type": "text", "text": "How many?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
                    {"role": "user", "content": "left unanswered"}]
    assert history_pairs(gradio_style) == [("How many?", "two")]
    assert history_pairs(messages_of([("a", "b"), ("c", "d")])) == [("a", "b"), ("c", "d")]
    assert history_pairs(None) == []


def test_ask_examples_pair_example_images_with_questions():
    from app.multimodal_layout import ask_examples

    examples = ask_examples(EXAMPLES)
    assert examples and all(Path(path).is_file() and question.endswith(("?", ".")) for path, question in examples)
    names = [json.loads(line)["file"] for line in (EXAMPLES / "captions.jsonl").read_text().splitlines()]
    assert [Path(p).name for p, _ in examples] == [n for n in names if n in {Path(p).name for p, _ in examples}]


def test_without_a_model_both_tabs_show_the_notice_and_register_no_endpoint():
    import gradio as gr

    from app.multimodal_layout import multimodal_tabs

    with gr.Blocks() as demo:
        multimodal_tabs(None, "the model is not here yet")
    config = demo.get_config_file()
    texts = [c["props"].get("value") or "" for c in config["components"] if c["type"] == "markdown"]
    assert sum("the model is not here yet" in t for t in texts) == 2
    assert not config["dependencies"]


# --------------------------------------------------------------------------- start-up policy
def load_app_module():
    spec = importlib.util.spec_from_file_location("evotok_app_main", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_default_model_turns_the_tabs_off_with_a_notice(tmp_path):
    main = load_app_module()
    default = tmp_path / "mllm"
    service, notice = main.load_multimodal(str(default), default=default)
    assert service is None and "not here yet" in notice and "train_mllm.py" in notice and "--mllm" in notice
    service, notice = main.load_multimodal("none", default=default)
    assert service is None and "--mllm none" in notice
    default.mkdir()
    (default / "config.json").write_text("{not json")
    service, notice = main.load_multimodal(str(default), default=default)  # a broken default: tabs off, say why
    assert service is None and "did not load" in notice


def test_an_explicit_model_that_does_not_load_refuses_start_up(tmp_path):
    main = load_app_module()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "evotok_mllm"}))
    with pytest.raises(ValueError):  # CheckpointError or the config's own ValueError
        main.load_multimodal(str(broken), default=tmp_path / "default")
    checkpoint = tmp_path / "tokenizer"
    checkpoint.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--mllm",
                             str(tmp_path / "nothing-here"), "--port", str(free_port())], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert result.returncode == 2
    assert "could not load the multimodal model" in result.stderr and "Traceback" not in result.stderr

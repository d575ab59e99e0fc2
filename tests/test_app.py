"""The demo end to end: ``python app.py`` in a subprocess, driven through gradio_client.

Uses the bundled tokenizer and multimodal model when ``assets/tokenizer`` and ``assets/mllm`` exist,
otherwise random stand-ins of the same shapes (the endpoints, error handling and layout do not depend
on trained weights). The multimodal tabs' tests are in ``test_app_mllm.py``; they share this app.
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "tokenizer"
BUNDLED_MLLM = ROOT / "assets" / "mllm"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False"}

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


# --------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stand_in_checkpoint(folder: Path) -> list[str]:
    """Random tokenizer + teacher with the bundled shapes; codebooks initialised by one forward."""
    import torch

    from evotok import EvoTok, small_config
    from evotok.teacher import TinySigLIPConfig, TinySigLIPTeacher

    torch.manual_seed(0)
    config = small_config(teacher=str(folder / "teacher"))
    heads = next(h for h in (4, 3, 2, 1) if config.teacher_dim % h == 0)
    teacher = TinySigLIPTeacher(TinySigLIPConfig(image_size=config.image_size, width=config.teacher_dim,
                                                 patch_size=config.image_size // config.grid_size, num_heads=heads))
    teacher.save_pretrained(folder / "teacher")
    tok = EvoTok(config)
    tok.train()
    with torch.no_grad():
        tok(torch.rand(16, 3, 64, 64) * 2 - 1)
    tok.save_pretrained(folder / "tokenizer")
    (folder / "tokenizer" / "README.md").write_text(
        "---\nmax_train_depth: 6\n---\n# Random stand-in\n\nTrained on nothing: random weights for the tests.\n")
    return ["--checkpoint", str(folder / "tokenizer")]


def stand_in_mllm(folder: Path, tokenizer_folder: Path) -> list[str]:
    """Random multimodal model of the bundled shape (training/configs/mllm_stage2.yaml) on the given
    tokenizer, with a BPE and word list trained on scene captions and questions."""
    import torch
    import yaml

    from evotok import EvoTok
    from evotok.data.scenes import SceneWorld
    from evotok.mllm import EvoTokMLLM, TextTokenizer, qwen2_lm_config
    from evotok.mllm.data import DESCRIBE_QUESTIONS, LABEL_QUESTIONS, text_only_pairs

    torch.manual_seed(0)
    config = yaml.safe_load((ROOT / "training" / "configs" / "mllm_stage2.yaml").read_text())
    model_cfg = config["model"]
    world = SceneWorld(resolution=32, seed=0)
    texts = [t for i in range(60) for t in (world[i].caption, *(x for qa in world[i].qa for x in qa))]
    texts += [*DESCRIBE_QUESTIONS, *(q for qs in LABEL_QUESTIONS.values() for q in qs),
              *(x for pair in text_only_pairs() for x in pair)]
    text = TextTokenizer.train(texts, vocab_size=int(config["text_tokenizer"]["vocab_size"]), min_frequency=1)
    tokenizer = EvoTok.from_pretrained(tokenizer_folder)
    adapters = {k: model_cfg[k] for k in ("depth_layers", "depth_width", "depth_heads", "max_prompt_tokens",
                                          "max_answer_tokens") if k in model_cfg}
    model = EvoTokMLLM.build(tokenizer, text, image_tokenizer_path=str(tokenizer_folder),
                             lm_config=qwen2_lm_config(len(text), **model_cfg["lm"]), **adapters)
    model.save_pretrained(folder)
    (folder / "README.md").write_text("# Random multimodal stand-in\n\nTrained on nothing: random weights for the "
                                      "tests, on the bundled architecture.\n")
    return ["--mllm", str(folder)]


def app_args(tmp: Path) -> list[str]:
    bundled_tokenizer = (BUNDLED / "config.json").is_file()
    args = [] if bundled_tokenizer else stand_in_checkpoint(tmp)
    if bundled_tokenizer and (BUNDLED_MLLM / "config.json").is_file():
        return args
    return args + stand_in_mllm(tmp / "mllm", BUNDLED if bundled_tokenizer else tmp / "tokenizer")


@contextlib.contextmanager
def running_app(tmp: Path, extra: list[str] = (), timeout: float = 240.0):
    """Start ``python app.py`` on a free port; yield its URL; stop it (and only it) afterwards."""
    port = free_port()
    log = open(tmp / f"app-{port}.log", "w+")
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--cache-dir", str(tmp / "cache"),
           "--no-warmup", *app_args(tmp), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"app.py not ready after {timeout:.0f} s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_SHARED: dict[str, tuple] = {}


def shared_app(tmp_path_factory, request) -> tuple[str, subprocess.Popen, object]:
    """One app process for every test module of the session (the browser test reuses it), stopped
    when pytest finishes. Starting the app is the slowest part of these tests."""
    if "app" not in _SHARED:
        context = running_app(tmp_path_factory.mktemp("app"), ["--umap-per-source", "12"])
        _SHARED["app"] = context.__enter__()
        request.config.add_cleanup(lambda: (_SHARED.pop("app", None), context.__exit__(None, None, None)))
    return _SHARED["app"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, request):
    url, proc, log = shared_app(tmp_path_factory, request)
    yield Client(url, verbose=False), proc, log


# --------------------------------------------------------------------------- inputs
def save(img: Image.Image, path: Path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("inputs")
    from skimage import data as skdata

    from evotok.data.scenes import SceneWorld

    files = {
        "photo": save(Image.fromarray(skdata.chelsea()).resize((256, 256)), tmp / "photo.jpg", quality=90),
        "scene": save(SceneWorld(resolution=256, seed=3)[0].image, tmp / "scene.png"),
    }
    clipart = sorted(Path("/usr/share/openclipart/png").rglob("*.png"))[:1]
    rgba = Image.new("RGBA", (120, 90), (255, 0, 0, 0))
    rgba.paste((20, 120, 220, 255), (30, 20, 90, 70))
    files["clipart"] = str(clipart[0]) if clipart else save(rgba, tmp / "clipart.png")
    files["rgba"] = save(rgba, tmp / "rgba.png")
    files["palette"] = save(Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).convert("P"),
                            tmp / "palette.png")
    files["grey"] = save(Image.linear_gradient("L").resize((80, 80)), tmp / "grey.png")
    grey16 = Image.fromarray((np.linspace(0, 65535, 70 * 70).reshape(70, 70)).astype(np.uint16))
    files["grey16"] = save(grey16, tmp / "grey16.png")
    files["cmyk"] = save(Image.new("CMYK", (90, 90), (0, 200, 200, 0)), tmp / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display upright
    files["exif"] = save(Image.new("RGB", (120, 60), (10, 200, 10)), tmp / "exif.jpg", exif=exif)
    files["wide"] = save(Image.new("RGB", (300, 100), (200, 200, 10)), tmp / "wide.png")
    files["tiny"] = save(Image.new("RGB", (3, 3), (200, 10, 200)), tmp / "tiny.png")
    files["huge"] = save(Image.new("RGB", (4000, 3000), (90, 90, 200)), tmp / "huge.jpg", quality=70)
    (tmp / "bomb.png").write_bytes(png_header_only(30000, 30000))
    files["bomb"] = str(tmp / "bomb.png")
    (tmp / "notes.txt").write_text("this is a text file, not an image")
    files["text"] = str(tmp / "notes.txt")
    good = (tmp / "scene.png").read_bytes()
    (tmp / "truncated.png").write_bytes(good[: len(good) // 2])
    files["truncated"] = str(tmp / "truncated.png")
    (tmp / "empty.png").write_bytes(b"")
    files["empty"] = str(tmp / "empty.png")
    return files


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares a gigantic canvas (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def explore(client: Client, path: str | None, labels: str = ""):
    return client.predict(handle_file(path) if path else None, labels, api_name="/explore")


# --------------------------------------------------------------------------- tests
def test_endpoints_are_public(app):
    client, _, _ = app
    api = client.view_api(print_info=False, return_format="dict")
    assert {"/explore", "/codebook", "/umap"} <= set(api["named_endpoints"])
    params = [p["parameter_name"] for p in api["named_endpoints"]["/explore"]["parameters"]]
    assert params == ["image", "labels"]


@pytest.mark.parametrize("kind", ["photo", "clipart", "scene"])
def test_explore_returns_every_stage(app, inputs, kind):
    client, _, _ = app
    started = time.perf_counter()
    (input_image, gallery, metrics, probe_plot, probe_table, codes_plot, codes_file, status) = explore(
        client, inputs[kind], "cat, circle, red, dress")
    elapsed = time.perf_counter() - started
    assert Path(input_image).is_file()
    stages = len(gallery)
    assert stages >= 2
    assert all(Path(item["image"]).is_file() for item in gallery)
    captions = [item["caption"] for item in gallery]
    assert all(f"depth {d}" in c and "dB" in c for d, c in zip(range(1, stages + 1), captions))
    assert sum("Lpix" in c for c in captions) == 1 and sum("Lsem" in c for c in captions) == 1
    assert metrics["type"] == "plotly" and "PSNR" in metrics["plot"] and "cosine to teacher" in metrics["plot"]
    assert probe_plot["type"] == "plotly" and codes_plot["type"] == "plotly"
    assert len(probe_table["data"]) == stages + 1 and probe_table["data"][-1][0] == "teacher"
    assert any(label in probe_table["data"][0][1] for label in ("cat", "circle", "red", "dress"))
    import json

    payload = json.loads(Path(codes_file).read_text())
    assert payload["format"] == "evotok-codes" and payload["num_stages"] == stages
    assert np.asarray(payload["codes"]).shape == (*payload["grid"], stages)
    assert "**Input.**" in status and "Computed in" in status
    assert elapsed < 30


NORMALISED = {
    "rgba": "composited onto white",
    "palette": "palette",
    "grey": "greyscale",
    "grey16": "16-bit",
    "cmyk": "CMYK",
    "exif": "EXIF orientation",
    "wide": "centre-cropped",
    "tiny": "upscaled",
    "huge": "downscaled from 4000×3000",
}


@pytest.mark.parametrize("kind", sorted(NORMALISED))
def test_unusual_images_are_normalised_with_a_note(app, inputs, kind):
    client, _, _ = app
    outputs = explore(client, inputs[kind])
    status = outputs[-1]
    assert NORMALISED[kind] in status, status
    assert len(outputs[1]) >= 2  # the gallery is there


REFUSED = {
    "bomb": "decompression bomb",
    "text": "not an image format",
    "truncated": "truncated or corrupt",
    "empty": "empty",
    None: "Upload an image first",
}


@pytest.mark.parametrize("kind", list(REFUSED), ids=[str(k) for k in REFUSED])
def test_bad_inputs_get_a_clear_message_and_the_app_stays_up(app, inputs, kind):
    client, proc, _ = app
    with pytest.raises(AppError) as info:
        explore(client, inputs[kind] if kind else None)
    message = str(info.value)
    assert REFUSED[kind] in message
    assert "Traceback" not in message and 'File "' not in message
    assert proc.poll() is None
    assert len(explore(client, inputs["scene"])[1]) >= 2  # still answering


def test_too_many_labels_is_a_clear_error(app, inputs):
    client, _, _ = app
    with pytest.raises(AppError, match="at most"):
        explore(client, inputs["scene"], ",".join(f"label {i}" for i in range(500)))


def test_codebook_endpoint(app):
    client, _, _ = app
    figure, summary = client.predict(api_name="/codebook")
    assert figure["type"] == "plotly"
    for panel in ("usage", "perplexity", "dead codes"):
        assert panel in figure["plot"]
    assert "stages" in summary and "dead codes" in summary


def test_umap_endpoint_computes_then_caches(app):
    client, _, log = app
    figure, note = client.predict(4, "prefix latent", "source", api_name="/umap")
    assert figure["type"] == "plotly" and "UMAP" in figure["plot"]
    assert "held-out images" in note and "computed" in note
    figure2, note2 = client.predict(4, "prefix latent", "label", api_name="/umap")
    assert "loaded from the cache" in note2 and figure2["plot"] != figure["plot"]  # coloured differently
    with pytest.raises(AppError, match="depth|maximum"):
        client.predict(99, "prefix latent", "label", api_name="/umap")


def test_missing_checkpoint_fails_fast_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tmp_path / "nothing-here"),
                             "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **OFFLINE_ENV})
    assert result.returncode == 2
    assert "could not load the models" in result.stderr and "Traceback" not in result.stderr


def test_find_examples_takes_each_kind(tmp_path):
    from app.layout import find_examples

    for name in ("photo_a", "photo_b", "clipart_a", "scene_a", "scene_b", "scene_c", "scene_d", "other"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    found = [Path(p).stem for p in find_examples(tmp_path, per_kind=3)]
    assert found == ["photo_a", "photo_b", "clipart_a", "scene_a", "scene_b", "scene_c"]
    assert find_examples(tmp_path / "missing") == []

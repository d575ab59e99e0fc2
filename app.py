"""Start the EvoTok demo (Gradio): ``python app.py [--checkpoint FOLDER_OR_HUB_ID] [--mllm FOLDER_OR_HUB_ID]``.

Runs offline on the bundled tokenizer (``assets/tokenizer``), its teacher and the bundled multimodal
model (``assets/mllm``: the "Text to image" and "Ask about an image" tabs) by default. Host and
port also come from ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (as on Hugging Face Spaces);
``EVOTOK_CHECKPOINT``, ``EVOTOK_TEACHER``, ``EVOTOK_MLLM`` and ``EVOTOK_CACHE_DIR`` stand in for the
flags of the same names (a Space has variables, not command lines).
"""
from __future__ import annotations

import os

# Offline by default, before any hub library is imported (an online lookup retries for ~50 s).
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
                     "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "assets" / "tokenizer"
DEFAULT_MLLM = ROOT / "assets" / "mllm"
DEFAULT_EXAMPLES = ROOT / "assets" / "examples"
MLLM_MISSING_NOTICE = (
    "**The bundled multimodal model is not here yet** (no `assets/mllm` folder), so this tab is off. "
    "Train it with `python training/train_mllm.py --config training/configs/mllm_stage1.yaml` and then "
    "`mllm_stage2.yaml` (it is saved to `assets/mllm`), or start the app with `--mllm FOLDER_OR_HUB_ID` "
    "(or `EVOTOK_MLLM`). The stage explorer and the codebook tabs work without it.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=env.get("EVOTOK_CHECKPOINT", str(DEFAULT_CHECKPOINT)),
                        help="tokenizer folder or Hugging Face Hub id (default: the bundled assets/tokenizer, "
                             "or $EVOTOK_CHECKPOINT)")
    parser.add_argument("--teacher", default=env.get("EVOTOK_TEACHER"),
                        help="teacher folder or hub id (default: the one the tokenizer's config names, or "
                             "$EVOTOK_TEACHER; 'none' to disable)")
    parser.add_argument("--mllm", default=env.get("EVOTOK_MLLM", str(DEFAULT_MLLM)),
                        help="multimodal model folder or hub id for the text-to-image and ask tabs (default: the "
                             "bundled assets/mllm, or $EVOTOK_MLLM; 'none' to turn the tabs off). A missing "
                             "default only turns the tabs off; a given one that does not load stops start-up")
    parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--examples", default=str(DEFAULT_EXAMPLES), help="folder of example images")
    parser.add_argument("--cache-dir", default=env.get("EVOTOK_CACHE_DIR", str(Path.home() / ".cache" / "evotok" / "app")),
                        help="where UMAP features and embeddings are cached (default ~/.cache/evotok/app or $EVOTOK_CACHE_DIR)")
    parser.add_argument("--umap-per-source", type=int, default=100, help="held-out images per source in the UMAP view")
    parser.add_argument("--concurrency", type=int, default=2, help="model calls running at once")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting at most (then 'queue full')")
    parser.add_argument("--max-file-size", default="50mb", help="largest upload accepted")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device for the models")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up call after start-up")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    problem = check_checkpoint_argument(args.checkpoint) or check_mllm_argument(args.mllm)
    if problem:  # before the slow imports: a wrong path fails in a fraction of a second
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import torch

    from app import Callbacks, MultimodalCallbacks, ask_examples, build_demo, find_examples
    from evotok.explore import Explorer
    from evotok.hub import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        explorer = Explorer.load(args.checkpoint, args.teacher, search_dirs=[ROOT], device=args.device)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: could not load the models: {err}", file=sys.stderr)
        return 2
    loading = time.perf_counter()
    try:
        service, notice = load_multimodal(args.mllm, explorer.tok, args.device)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        print(f"error: could not load the multimodal model {args.mllm!r}: {err}", file=sys.stderr)
        return 2
    logging.getLogger("evotok.app").info("multimodal model: %s (%.1f s)",
                                         "loaded" if service else "off", time.perf_counter() - loading)
    callbacks = Callbacks(explorer, cache_dir=args.cache_dir, umap_per_source=args.umap_per_source)
    demo = build_demo(callbacks, find_examples(args.examples), concurrency=args.concurrency, max_queue=args.max_queue,
                      multimodal=MultimodalCallbacks(service) if service else None, multimodal_notice=notice,
                      ask_examples=ask_examples(args.examples))
    logging.getLogger("evotok.app").info("models and page ready in %.1f s", time.perf_counter() - started)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size,
                prevent_thread_lock=True, show_error=True, footer_links=["api"], css=app_css(),
                state_session_capacity=256)
    if not args.no_warmup:
        warm_up(explorer)
    demo.block_thread()
    return 0


def check_checkpoint_argument(checkpoint: str) -> str:
    """A message when ``checkpoint`` is clearly a local folder that is not there ('' otherwise).

    Hub ids look like ``owner/name``; anything absolute or starting with ``.`` or ``~`` is a path.
    """
    path = Path(checkpoint).expanduser()
    if checkpoint == str(DEFAULT_CHECKPOINT) and not path.is_dir():
        return (f"the bundled tokenizer is missing ({DEFAULT_CHECKPOINT}). Pass --checkpoint FOLDER_OR_HUB_ID, "
                "or train one with training/train_tokenizer.py.")
    if (path.is_absolute() or checkpoint.startswith((".", "~"))) and not path.is_dir():
        return f"could not load the models: no checkpoint folder at {path}"
    return ""


def check_mllm_argument(mllm: str) -> str:
    """A message when an explicitly given ``--mllm`` is clearly a local folder that is not there."""
    path = Path(mllm).expanduser()
    if mllm == str(DEFAULT_MLLM) or mllm.lower() == "none":
        return ""
    if (path.is_absolute() or mllm.startswith((".", "~"))) and not path.is_dir():
        return f"could not load the multimodal model: no folder at {path} (pass --mllm none to run without it)"
    return ""


def load_multimodal(mllm: str, shared_tokenizer=None, device: str = "cpu", default: Path = DEFAULT_MLLM):
    """``(MultimodalService | None, notice)`` by the --teacher policy: the default model may be missing
    or broken (the tabs then show ``notice``); an explicitly given one must load (errors propagate)."""
    from evotok.hub import CheckpointError
    from evotok.mllm.serving import MultimodalService

    log = logging.getLogger("evotok.app")
    if mllm.lower() == "none":
        return None, "The multimodal model is turned off (`--mllm none`)."
    if mllm != str(default):
        return MultimodalService.load(mllm, shared_tokenizer=shared_tokenizer, device=device), ""
    if not Path(default).is_dir():
        return None, MLLM_MISSING_NOTICE
    try:
        return MultimodalService.load(default, shared_tokenizer=shared_tokenizer, device=device), ""
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:
        log.exception("the bundled multimodal model did not load")
        return None, (f"**The bundled multimodal model (`{default}`) did not load:** {err}. The tab is off; the "
                      "server log has the details.")


def app_css() -> str:
    from app.layout import CSS

    return CSS


def warm_up(explorer) -> None:
    """One throw-away explorer call so the first visitor does not pay for lazy loading (text encoder)."""
    import torch

    try:
        explorer.explore(torch.zeros(3, explorer.config.image_size, explorer.config.image_size))
    except Exception:  # never fatal: the page works without it
        logging.getLogger("evotok.app").exception("warm-up call failed")


if __name__ == "__main__":
    sys.exit(main())

"""The page: a stage-explorer tab and a codebook tab, wired to ``app.callbacks``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import gradio as gr

from evotok.probe import DEFAULT_LABELS

from .callbacks import Callbacks
from .components import UploadedImage
from .multimodal_callbacks import MultimodalCallbacks
from .multimodal_layout import multimodal_tabs

CSS = """
#evotok-gallery .caption-label, #evotok-gallery figcaption { font-size: 0.78rem; white-space: normal; }
#evotok-status { font-size: 0.92rem; }
.evotok-note { color: var(--body-text-color-subdued); font-size: 0.9rem; }
.evotok-notice { border-left: 4px solid var(--color-accent); padding-left: 0.8rem; }
"""

INTRO = """# EvoTok stage explorer
EvoTok encodes an image as one **trajectory of residual codes**: each quantizer stage refines what the
previous stages left. The pixel decoder renders the short prefix (the *pixel depth*), the semantic decoder reads
the long one (the *semantic depth*). Drop in an image to see what every stage adds, and where along the chain
the teacher's semantics appear. The *Text to image* and *Ask about an image* tabs put the same codes to work
inside one small multimodal language model that draws and reads them."""

HOW_TO_READ = """**How to read it.** The gallery shows the picture decoded after 1, 2, … D stages (PSNR against the
input in each caption). The chart puts the pixel branch (PSNR, SSIM) beside the semantic branch (cosine between the
semantic decoder's prediction and the teacher's real features). The probe reads the prediction at every depth
through the teacher's own head and text side and ranks the labels you list (softmax over your list). Depths marked
*off-distribution* lie beyond the prefixes the pixel decoder was trained to render."""


def find_examples(folder: str | Path, per_kind: int = 3) -> list[str]:
    """Up to ``per_kind`` images of each kind (photo_*, clipart_*, scene_*) from the examples folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    picked: list[str] = []
    for prefix in ("photo_", "clipart_", "scene_"):
        picked += [str(p) for p in sorted(folder.glob(f"{prefix}*.png"))[:per_kind]]
    rest = [str(p) for p in sorted(folder.glob("*.png")) if str(p) not in picked]
    return picked or rest[: 3 * per_kind]


def build_demo(callbacks: Callbacks, examples: Sequence[str] = (), concurrency: int = 2,
               max_queue: int = 32, multimodal: MultimodalCallbacks | None = None,
               multimodal_notice: str = "", ask_examples: Sequence[Sequence[str]] = ()) -> gr.Blocks:
    """The page. ``multimodal`` adds the text-to-image and ask tabs (``generate`` and ``ask``
    endpoints); without it those tabs show ``multimodal_notice``."""
    explorer = callbacks.explorer
    config = explorer.config
    stages = config.num_stages
    with gr.Blocks(title="EvoTok stage explorer", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(explorer.describe(), elem_classes=["evotok-note"])
        if explorer.card.body:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(explorer.card.body)

        with gr.Tab("Stage explorer"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=280):
                    image_in = UploadedImage(type="filepath", image_mode=None, label="Your image (any format PIL reads)",
                                             sources=["upload", "clipboard"], height=260, elem_id="evotok-input")
                    labels_in = gr.Textbox(value=", ".join(DEFAULT_LABELS), lines=4, max_lines=8,
                                           label="Probe labels (comma-separated; empty = defaults)",
                                           elem_id="evotok-labels")
                    run = gr.Button("Explore the stages", variant="primary", elem_id="evotok-run")
                    example_block = None
                    if examples:
                        example_block = gr.Examples(examples=[[p] for p in examples], inputs=[image_in],
                                                    label="Examples: photos, clip art, scenes (click one)",
                                                    cache_examples=False, examples_per_page=12)
                with gr.Column(scale=2, min_width=420):
                    with gr.Row():
                        input_view = gr.Image(label=f"Input as the model sees it ({config.image_size}×{config.image_size})",
                                              format="png", interactive=False, height=280, elem_id="evotok-input-view")
                        depth_view = gr.Image(label="Reconstruction at the chosen depth", format="png",
                                              interactive=False, height=280, elem_id="evotok-depth-view")
                    depth = gr.Slider(1, stages, value=config.pixel_depth, step=1, label="Depth (stages)",
                                      info=f"pixel depth {config.pixel_depth}, semantic depth {config.semantic_depth}",
                                      elem_id="evotok-depth")
                    status = gr.Markdown("Upload an image or click an example.", elem_id="evotok-status")
            gallery_rows = math.ceil(stages / 8)
            gallery = gr.Gallery(label="Reconstruction after each stage", columns=min(stages, 8), rows=gallery_rows,
                                 height=24 + 170 * gallery_rows, object_fit="contain", format="png",
                                 elem_id="evotok-gallery", preview=False)
            metrics_plot = gr.Plot(label="Pixels and semantics against depth", elem_id="evotok-metrics")
            with gr.Row(equal_height=False):
                probe_plot = gr.Plot(label="Zero-shot probe by depth", elem_id="evotok-probe-plot", scale=3)
                probe_table = gr.Dataframe(label="Top labels at each depth (teacher = on the real image)",
                                           interactive=False, wrap=True, elem_id="evotok-probe-table", scale=2,
                                           max_height=600, column_widths=["22%", "63%", "15%"])
            codes_plot = gr.Plot(label="Codes", elem_id="evotok-codes")
            codes_file = gr.File(label="Download the codes (JSON: codes[row][col][stage])", interactive=False,
                                 elem_id="evotok-codes-file")
            gr.Markdown(HOW_TO_READ, elem_classes=["evotok-note"])
            state = gr.State()

        multimodal_tabs(multimodal, multimodal_notice, ask_examples, concurrency)

        with gr.Tab("Codebook"):
            stats_md = gr.Markdown()
            stats_plot = gr.Plot(label="Codebook health per stage", elem_id="evotok-codebook")
            refresh = gr.Button("Refresh statistics", size="sm")
            gr.Markdown("### Stage features of held-out images (UMAP)\nComputed on request (scenes, clip art and "
                        "Fashion-MNIST held-out images) and cached on disk; the first fit in a fresh process takes "
                        "longer while numba compiles.")
            with gr.Row():
                umap_depth = gr.Slider(1, stages, value=config.semantic_depth, step=1, label="Depth (stages)")
                umap_kind = gr.Radio(["semantic decoder output", "prefix latent"], value="semantic decoder output",
                                     label="Features")
                umap_colour = gr.Radio(["label", "source"], value="label", label="Colour by")
            umap_run = gr.Button("Compute UMAP", variant="primary")
            umap_plot = gr.Plot(label="UMAP", elem_id="evotok-umap")
            umap_note = gr.Markdown()

        outputs = [input_view, gallery, metrics_plot, probe_plot, probe_table, codes_plot, codes_file, status, state]
        show = dict(fn=callbacks.show_depth, inputs=[state, depth], outputs=depth_view, api_visibility="private",
                    concurrency_limit=None, show_progress="hidden")
        model = dict(concurrency_id="model", concurrency_limit=concurrency)
        run.click(callbacks.explore, [image_in, labels_in], outputs, api_name="explore", **model).success(**show)
        if example_block is not None:  # clicking an example fills the input, then explores it
            example_block.load_input_event.then(callbacks.explore, [image_in, labels_in], outputs,
                                                api_visibility="private", **model).success(**show)
        depth.change(**show)

        refresh.click(callbacks.codebook, None, [stats_plot, stats_md], api_name="codebook", concurrency_limit=None)
        demo.load(callbacks.codebook, None, [stats_plot, stats_md], api_visibility="private", concurrency_limit=None)
        umap_run.click(callbacks.umap, [umap_depth, umap_kind, umap_colour], [umap_plot, umap_note], api_name="umap",
                       concurrency_id="umap", concurrency_limit=1)
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo

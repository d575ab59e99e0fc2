"""The "Text to image" and "Ask about an image" tabs, wired to ``app.multimodal_callbacks``.

Called inside ``build_demo``'s ``gr.Blocks``. Without a loaded model both tabs show a notice
saying why and how to get one, and the ``generate`` / ``ask`` endpoints are not registered.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from evotok.mllm.serving import DEFAULT_CANDIDATES, DEFAULT_TEMPERATURE, MAX_PROMPT_CHARS, example_prompts

from .components import UploadedImage
from .multimodal_callbacks import MultimodalCallbacks

GENERATE_INTRO = """### Text to image
One language model draws the picture as EvoTok codes: it walks the token grid in raster order and, at each
cell, a small depth transformer picks that cell's pixel-stage codes one stage after another; classifier-free
guidance mixes the prompt's prediction with an empty prompt's at every stage. Prompts in the scene world's
language work best (colours, shapes, counts, left/right/above/below); a seed fixes the image exactly."""

ASK_INTRO = """### Ask about an image
The same model reads an image through the tokenizer's semantic decoder (the long prefix of the code chain) and
answers in words, streamed as they come. Follow-up questions keep the conversation about the same image; a new
image starts a new one."""

# Questions the model was trained to answer, for the bundled example images (file name -> question).
ASK_QUESTIONS = {
    "scene_colours.png": "What colour is the star?",
    "scene_counting.png": "How many triangles are there?",
    "scene_position.png": "Is the cross above or below the square?",
    "clipart_apple.png": "What category is this clip art from?",
    "photo_chelsea.png": "Describe the image.",
}


def ask_examples(folder: str | Path) -> list[list[str]]:
    """[image path, question] pairs for the example images that exist (captions.jsonl order)."""
    folder = Path(folder)
    names: list[str] = []
    captions = folder / "captions.jsonl"
    if captions.is_file():
        for line in captions.read_text().splitlines():
            try:
                names.append(json.loads(line)["file"])
            except (ValueError, KeyError, TypeError):
                continue
    names += [n for n in ASK_QUESTIONS if n not in names]
    return [[str(folder / n), ASK_QUESTIONS[n]] for n in names if n in ASK_QUESTIONS and (folder / n).is_file()]


def vocabulary_markdown(groups: dict[str, list[str]]) -> str:
    total = sum(len(words) for words in groups.values())
    lines = [f"{total:,} words met in training. Words outside this list are flagged when you generate."]
    lines += [f"**{title}** ({len(words)}): {', '.join(words)}" for title, words in groups.items()]
    return "\n\n".join(lines)


def multimodal_tabs(callbacks: MultimodalCallbacks | None, notice: str, examples: Sequence[Sequence[str]] = (),
                    concurrency: int = 2) -> None:
    """Both tabs (inside an open ``gr.Blocks``)."""
    if callbacks is None:
        for title in ("Text to image", "Ask about an image"):
            with gr.Tab(title):
                gr.Markdown(f"### {title}\n\n{notice}", elem_classes=["evotok-notice"])
        return
    model = dict(concurrency_id="model", concurrency_limit=concurrency)
    with gr.Tab("Text to image"):
        _text_to_image(callbacks, model)
    with gr.Tab("Ask about an image"):
        _ask(callbacks, examples, model)


def _text_to_image(callbacks: MultimodalCallbacks, model: dict[str, Any]) -> None:
    service = callbacks.service
    size, factor = service.image_size, callbacks.display_factor
    gr.Markdown(GENERATE_INTRO)
    gr.Markdown(service.describe(), elem_classes=["evotok-note"])
    if service.card_body:
        with gr.Accordion("Multimodal model card", open=False):
            gr.Markdown(service.card_body)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            prompt = gr.Textbox(label="Prompt", lines=2, max_lines=4, elem_id="evotok-prompt",
                                placeholder="a red circle to the left of a blue square",
                                info=f"At most {service.max_prompt_tokens} tokens (a short sentence; longer prompts "
                                     "are refused with a message). Empty = an unconditional sample.")
            guidance = gr.Slider(0, 10, value=3.0, step=0.5, label="Guidance scale",
                                 info="1 = the prompt's prediction alone; higher follows the prompt harder")
            temperature = gr.Slider(0, 2, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature", info="0 = greedy")
            top_k = gr.Slider(0, service.config.codebook_size, value=0, step=1, label="Top-k",
                              info=f"sample among the k likeliest codes of {service.config.codebook_size:,} (0 = off)")
            seed = gr.Number(value=-1, precision=0, label="Seed", minimum=-1,
                             info="-1 = a new random seed each time (the note says which); any other number "
                                  "gives the same image every time")
            candidates = gr.Slider(1, service.max_candidates, value=DEFAULT_CANDIDATES, step=1, label="Candidates",
                                   info="draw this many and keep the one the model itself reads back as the prompt "
                                        "best (16 take about three times as long as 1; 1 = plain sampling)")
            run = gr.Button("Generate", variant="primary", elem_id="evotok-generate")
            split = example_prompts()
            example_blocks = [
                gr.Examples(examples=[[p] for p in split["seen"]], inputs=[prompt], cache_examples=False,
                            label="Examples with colour-shape pairs seen in training (click one)"),
                gr.Examples(examples=[[p] for p in split["held-out"]], inputs=[prompt], cache_examples=False,
                            label="Examples with a held-out pair (never seen together in training)"),
            ]
            with gr.Accordion("Words the model knows", open=False):
                gr.Markdown(vocabulary_markdown(service.vocabulary_groups()), elem_id="evotok-vocabulary")
        with gr.Column(scale=2, min_width=420):
            image = gr.Image(label=f"Generated image ({size}×{size}, shown {factor}× with nearest-neighbour "
                                   "upscaling)", format="png", interactive=False, height=300,
                             elem_id="evotok-generated")
            stages = gr.Gallery(label="Building up stage by stage (the same codes decoded after 1, 2, … pixel "
                                      "stages)", columns=service.pixel_depth, rows=1, height=220,
                                object_fit="contain", format="png", preview=False, elem_id="evotok-generated-stages")
            note = gr.Markdown("Type a prompt or click an example.", label="Note", elem_id="evotok-generate-note")
    inputs, outputs = [prompt, guidance, temperature, top_k, seed, candidates], [image, stages, note]
    run.click(callbacks.generate, inputs, outputs, api_name="generate", **model)
    prompt.submit(callbacks.generate, inputs, outputs, api_visibility="private", **model)
    for block in example_blocks:  # clicking an example fills the prompt, then draws it
        block.load_input_event.then(callbacks.generate, inputs, outputs, api_visibility="private", **model)


def _ask(callbacks: MultimodalCallbacks, examples: Sequence[Sequence[str]], model: dict[str, Any]) -> None:
    service = callbacks.service
    gr.Markdown(ASK_INTRO)
    gr.Markdown(service.describe(), elem_classes=["evotok-note"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            image = UploadedImage(type="filepath", image_mode=None, label="Image (any format PIL reads)",
                                  sources=["upload", "clipboard"], height=240, elem_id="evotok-ask-image")
            question = gr.Textbox(label="Question", lines=1, max_lines=3, elem_id="evotok-question",
                                  placeholder="What colour is the star?",
                                  info=f"At most {service.max_prompt_tokens} tokens; press Enter to ask.",
                                  max_length=MAX_PROMPT_CHARS * 2)
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="evotok-ask")
                clear = gr.Button("New conversation", elem_id="evotok-ask-clear")
            example_block = None
            if examples:
                example_block = gr.Examples(examples=[list(e) for e in examples], inputs=[image, question],
                                            cache_examples=False, label="Examples: image and question (click one)")
        with gr.Column(scale=2, min_width=420):
            chat = gr.Chatbot(label="Conversation", height=380, elem_id="evotok-chat", buttons=["copy"],
                              placeholder="Upload an image and ask about it.")
            answer = gr.Textbox(label="Last answer", interactive=False, elem_id="evotok-answer", visible=False)
            note = gr.Markdown(label="Note", elem_id="evotok-ask-note", elem_classes=["evotok-note"])
    outputs = [chat, answer, note]
    clear_question = dict(fn=lambda: "", inputs=None, outputs=question, api_visibility="private",
                          show_progress="hidden", queue=False)
    ask.click(callbacks.ask, [image, question, chat], outputs, api_name="ask", **model).success(**clear_question)
    question.submit(callbacks.ask, [image, question, chat], outputs, api_visibility="private",
                    **model).success(**clear_question)
    new_chat = dict(fn=lambda: ([], "", ""), inputs=None, outputs=outputs, api_visibility="private",
                    show_progress="hidden", queue=False)
    clear.click(**new_chat)
    image.upload(**new_chat)
    image.clear(**new_chat)
    if example_block is not None:  # a clicked example starts a new conversation and asks its question
        example_block.load_input_event.then(callbacks.ask_fresh, [image, question], outputs,
                                            api_visibility="private", **model)

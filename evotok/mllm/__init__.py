"""The multimodal model: chat about images and generate images from text with EvoTok codes."""
from .chat import EmptyPromptError, PromptTooLongError, encode_chat, encode_generation, render_chat
from .config import MLLMConfig, qwen2_lm_config
from .model import EvoTokMLLM, MLLMOutput
from .text_tokenizer import SPECIAL_TOKENS, TextTokenizer

__all__ = [
    "EmptyPromptError", "EvoTokMLLM", "MLLMConfig", "MLLMOutput", "PromptTooLongError", "SPECIAL_TOKENS",
    "TextTokenizer", "encode_chat", "encode_generation", "qwen2_lm_config", "render_chat",
]

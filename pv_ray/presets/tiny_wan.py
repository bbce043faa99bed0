"""The `tiny-wan` and `tiny-wan2.2` presets: Wan 2.1 / 2.2 at tiny size, seeded, in the real layout.

Every component of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (model_index.json, transformer/, vae/,
text_encoder/ as `UMT5EncoderModel`, tokenizer/, scheduler/) with seeded random weights, plus an
insightface pack (faces/), written as the real folder is and read by the same loader. The sizes are
diffusers' own test dummies (2 blocks, 2 heads of 12, VAE base_dim 3); the tokenizer is a UMT5-style
(T5TokenizerFast, sentencepiece-like unigram) one built offline over single characters. Wan 2.2 A14B
adds a second expert (transformer_2/, the low-noise one) and `boundary_ratio` 0.875. Same seed,
byte-identical files.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from pv_ray.presets.tiny import build_once, default_cache_dir, save_transformers_model

TINY_WAN_VERSION = 1  # bump when the tiny Wan architecture changes, so caches rebuild
WAN_VERSIONS = {"2.1": 1, "2.2": 2}  # -> number of experts
WAN22_BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B's: the high-noise expert for t >= 875 of 1000
TEXT_DIM = 32


def umt5_tokenizer():
    """A T5TokenizerFast over single characters (with and without the word-start marker), with UMT5's
    special tokens (<pad> 0, </s> 1, <unk> 2) and its end-of-sequence template: any text tokenizes offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    pieces = ["<pad>", "</s>", "<unk>", "▁", *chars, *("▁" + c for c in chars)]
    vocab = [(piece, 0.0 if i < 3 else -float(len(piece))) for i, piece in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=512,
    )  # fmt: skip


def tiny_wan_parts(experts: int = 1):
    """Seeded-by-the-caller tiny transformer(s), causal VAE and UMT5 encoder (diffusers' test dummy sizes)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformers = [
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )  # fmt: skip
        for _ in range(experts)
    ]
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    with torch.no_grad():
        # Random decoders output low-contrast frames (std 0.12); 4x gives a photo's contrast
        # (std 0.4), which the tiny face detector's contrast gate needs to see faces in them.
        vae.decoder.conv_out.weight.mul_(4)
        vae.decoder.conv_out.bias.mul_(4)
    tokenizer = umt5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )  # fmt: skip
    )
    return transformers, vae, text_encoder, tokenizer


def tiny_flow_scheduler():
    """Wan's sampler: UniPC on flow matching, shift 3.0 (the 1.3B model's at 480p)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def build_tiny_wan_models(out_dir: str | Path, seed: int = 0, version: str = "2.1") -> Path:
    """Write a tiny Wan `version` (2.1 or 2.2) diffusers folder with faces/ to `out_dir`."""
    import diffusers

    from pv_ray.faces.tiny_pack import build_tiny_face_pack

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers, vae, text_encoder, tokenizer = tiny_wan_parts(WAN_VERSIONS[version])
    for part, transformer in zip(("transformer", "transformer_2"), transformers):
        transformer.save_pretrained(out / part)
    vae.save_pretrained(out / "vae")
    save_transformers_model(text_encoder, out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    tiny_flow_scheduler().save_pretrained(out / "scheduler")
    build_tiny_face_pack(out / "faces", seed=seed)
    two = len(transformers) == 2
    # WanPipeline's index, so plain `WanPipeline.from_pretrained(out)` works too.
    model_index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "boundary_ratio": WAN22_BOUNDARY_RATIO if two else None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return out


def ensure_tiny_wan_models(seed: int = 0, version: str = "2.1", cache_dir: str | Path | None = None) -> Path:
    """Return the tiny Wan `version` folder, building it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"tiny-wan{version}-v{TINY_WAN_VERSION}-seed{seed}"
    return build_once(target, lambda tmp: build_tiny_wan_models(tmp, seed=seed, version=version))

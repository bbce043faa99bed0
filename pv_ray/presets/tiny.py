"""The `tiny` preset: every model of the system, small and seeded, in the real on-disk formats.

No model hub is reachable from the build machines, so the tiny preset builds an AnimateDiff
pipeline folder (diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/, motion_adapter/) and an insightface model pack (faces/) from small configs with
seeded random weights. The loaders that read real SD1.5 + AnimateDiff + antelopev2 weights read
these too. Same seed, byte-identical files.

The `tiny-prior` preset is the same folder with a trained VAE, UNet and motion adapter (shipped
in `presets/tiny_prior/`, made by `jobs/train_tiny_prior.py`): a small but real text-to-video
model of faces moving over panning scenes, whose motion modules carry the motion.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = 3  # bump when the tiny architecture changes, so caches rebuild
TINY_PRIOR_ASSETS = Path(__file__).resolve().parent / "tiny_prior"
TINY_PRIOR_PARTS = ("vae", "unet", "motion_adapter")  # trained; the rest is the seed-0 tiny preset
_COMPLETE = ".complete"


def clip_text_encoder_and_tokenizer(
    hidden_size: int = 32, intermediate_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4
):
    """A CLIP text encoder (tiny by default; the benchmarks ask for CLIP-L sizes) and the offline
    byte-level tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Byte-level vocabulary with no merges: covers any text offline, like CLIP's BPE does.
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=77,
            projection_dim=hidden_size,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    return text_encoder, tokenizer


def tiny_unet_and_motion_adapter():
    from diffusers import MotionAdapter, UNet2DConditionModel

    channels = (32, 64)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    motion_adapter = MotionAdapter(
        block_out_channels=channels,
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    return unet, motion_adapter


def tiny_vae():
    from diffusers import AutoencoderKL

    # Four blocks: the same 8x spatial downsampling as SD1.5's VAE, with few channels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    # SD1.5's noise schedule. "trailing" spacing because the tiny preset samples with few
    # steps: the last step then starts inside the isolation window (t = 249 of 1000 for 4 steps).
    # v-prediction: an untrained UNet cannot predict the noise, and epsilon parametrisation
    # would then blow the latents up (x0 = (x - eps) / sqrt(alpha) ~ 15 sigma); with v, x0 is a
    # bounded mix of the noisy sample and the UNet output, so random-weight rollouts stay sane
    # and keep the structure (and motion) formed in earlier steps.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


def tiny_controlnet(unet2d, seed: int = 0):
    """A ControlNet of the tiny UNet (`ControlNetModel.from_unet`) whose zero-initialised parts get
    small seeded weights, standing in for training: an untrained ControlNet adds nothing. The
    residuals enter the UNet's skip connections where the condition image is, so the frames
    follow the control locally (a moving blob moves the change it makes)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the conditioning embedding's own layers start random
        net = ControlNetModel.from_unet(unet2d)
    gen = torch.Generator().manual_seed(seed)
    zero_initialised = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
    with torch.no_grad():
        for i, layer in enumerate(zero_initialised):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (0.1 if i == 0 else 0.3))
    return net


def save_transformers_model(model, folder: Path) -> None:
    """What `save_pretrained` writes (config.json, model.safetensors; the same bytes), written on
    every process: transformers writes nothing on a torch.distributed rank other than 0, which a
    Ray Train worker building the preset into its node's cache is."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # a tied weight (UMT5's shared embedding) is saved once
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder (with motion_adapter/, controlnet/ and faces/) to `out_dir`."""
    from pv_ray.faces.tiny_pack import build_tiny_face_pack

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, motion_adapter = tiny_unet_and_motion_adapter()
        vae = tiny_vae()
        text_encoder, tokenizer = clip_text_encoder_and_tokenizer()
    scheduler = tiny_scheduler()

    unet.save_pretrained(out / "unet")
    motion_adapter.save_pretrained(out / "motion_adapter")
    vae.save_pretrained(out / "vae")
    save_transformers_model(text_encoder, out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    build_tiny_face_pack(out / "faces", seed=seed)
    tiny_controlnet(unet, seed=seed).save_pretrained(out / "controlnet")

    import diffusers

    # An AnimateDiff pipeline index, so plain `AnimateDiffPipeline.from_pretrained(out)` works too.
    model_index = {
        "_class_name": "AnimateDiffPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "motion_adapter": ["diffusers", "MotionAdapter"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("PV_RAY_CACHE", Path.home() / ".cache" / "pv-ray")).expanduser()


def ensure_tiny_models(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the tiny preset's folder, building it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache / f"tiny-v{TINY_VERSION}-seed{seed}", lambda tmp: build_tiny_models(tmp, seed=seed))


def ensure_tiny_prior_models(cache_dir: str | Path | None = None, trained: Path = TINY_PRIOR_ASSETS) -> Path:
    """Return the `tiny-prior` folder, building it once: the tiny preset (seed 0) with its VAE,
    UNet and motion adapter replaced by trained ones, by default those shipped in
    `presets/tiny_prior/` (made by `jobs/train_tiny_prior.py`; see its `train_log.json`). The
    folder's name carries a hash of the trained weights, so new weights get a new folder."""
    digest = hashlib.sha256()
    for part in TINY_PRIOR_PARTS:
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            digest.update((trained / part / name).read_bytes())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    random_world = ensure_tiny_models(seed=0, cache_dir=cache)

    def build(tmp: Path) -> None:
        shutil.copytree(random_world, tmp, dirs_exist_ok=True)
        for part in TINY_PRIOR_PARTS:
            shutil.rmtree(tmp / part)
            shutil.copytree(trained / part, tmp / part)
        from diffusers import UNet2DConditionModel

        shutil.rmtree(tmp / "controlnet")  # a ControlNet of the trained UNet, not the random one
        tiny_controlnet(UNet2DConditionModel.from_pretrained(tmp / "unet")).save_pretrained(tmp / "controlnet")

    return build_once(cache / f"tiny-prior-v{TINY_VERSION}-{digest.hexdigest()[:12]}", build)


def build_once(target: Path, build) -> Path:
    """Run `build(tmp_folder)` once and rename the result to `target`. Safe under concurrent
    callers (Ray workers on one node): a file lock serialises the build, and the folder is
    renamed into place only when complete."""
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _COMPLETE).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            # A part without files (a library that skipped its write) is never marked complete.
            empty = sorted(part.name for part in tmp.iterdir() if part.is_dir() and not any(part.iterdir()))
            if empty:
                raise RuntimeError(f"building {target.name}: {', '.join(empty)} came out empty")
            (tmp / _COMPLETE).write_text("")
            if target.exists():  # a half-built leftover from a crash
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_random_adapters(
    backbone, cfg, store_uri: str, identity_ids: list[str], *, scale: float = 0.1, first_seed: int = 0
) -> list[str]:
    """Store one random adapter per id (seeds `first_seed`, `first_seed + 1`, ...) for `backbone`
    (loaded from `cfg`, a `PVConfig`: `pv_ray.backbones.load_backbone`), written by pv-ray's own
    writer: stand-in identities for tests and benchmarks of serving. Returns the ids."""
    import tempfile

    from pv_ray.model.adapter import IdentityAdapter
    from pv_ray.storage.adapter_folder import AdapterFolder
    from pv_ray.storage.adapter_store import AdapterStore

    adapter = IdentityAdapter.on(backbone, cfg.adapter)
    store = AdapterStore(store_uri)
    with tempfile.TemporaryDirectory(prefix="pv-ray-random-adapters-") as tmp:
        for seed, identity_id in enumerate(identity_ids, start=first_seed):
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
            folder = Path(tmp) / identity_id
            record = {"identity_id": identity_id, "config": cfg.model_dump(mode="json"), "backbone": backbone.record}
            AdapterFolder(folder).write(adapter.weights(), record)
            store.put(identity_id, folder)
    return identity_ids

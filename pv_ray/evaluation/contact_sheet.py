"""A picture of a batch's result: per identity, a reference photo, a base clip and the adapted clip.

Both clips use the same prompt (the identity's first held-out evaluation prompt) and the same
seed, so the only difference between the two rows of frames is the identity adapter. The sheet
shows reference photos: it is personal data, written only where asked (the demo writes one).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from pv_ray.config import PVConfig
from pv_ray.evaluation.clips import evaluation_spec
from pv_ray.faces.photos import PhotoRejected, decode_photo
from pv_ray.prompts import evaluation_prompts
from pv_ray.storage.adapter_folder import LoraWeights, recorded_active_fraction, recorded_adapter_config
from pv_ray.storage.adapter_store import AdapterStore
from pv_ray.storage.identity_folders import UnreadableFolder, read_identity_folder
from pv_ray.storage.personal_data import CONTACT_SHEET_IDENTITIES
from pv_ray.storage.video import frames_to_uint8

LABEL_WIDTH = 150
PAD = 4
SHEET_SEED = 0


def _label(text: str, height: int) -> Image.Image:
    image = Image.new("RGB", (LABEL_WIDTH, height), "white")
    ImageDraw.Draw(image).multiline_text((6, 6), text, fill="black", spacing=4)
    return image


def _row(cells: Sequence[Image.Image], height: int) -> Image.Image:
    width = sum(c.width for c in cells) + PAD * (len(cells) - 1)
    row = Image.new("RGB", (width, height), "white")
    x = 0
    for cell in cells:
        row.paste(cell, (x, 0))
        x += cell.width + PAD
    return row


def _frames(clip: np.ndarray, count: int) -> list[Image.Image]:
    picks = np.linspace(0, len(clip) - 1, min(count, len(clip))).round().astype(int)
    return [Image.fromarray(clip[i]) for i in picks]


def _reference_photo(input_uri: str, identity_id: str, cfg: PVConfig, storage_options: dict | None) -> Image.Image:
    """The identity's first photo the checked decoder accepts (grey when none can be read any more),
    read with the caps and the decoder of reference analysis: a file is judged by its content."""
    try:
        folder = read_identity_folder(
            identity_id,
            f"{input_uri.rstrip('/')}/{identity_id}",
            max_photo_bytes=cfg.faces.max_photo_bytes,
            max_photos=cfg.faces.max_photos_per_identity,
            max_total_bytes=cfg.faces.max_identity_bytes,
            storage_options=storage_options,
        )
    except UnreadableFolder:  # the photos were removed since the batch
        return Image.new("RGB", (64, 64), "grey")
    for data in folder.photos.values():
        try:
            return Image.fromarray(decode_photo(data, max_pixels=cfg.faces.max_pixels))
        except PhotoRejected:
            continue
    return Image.new("RGB", (64, 64), "grey")


def write_contact_sheet(
    cfg: PVConfig,
    store: AdapterStore,
    input_uri: str,
    identities: Sequence[str],
    out_path: str | Path,
    *,
    frames: int = 4,
    storage_options: dict | None = None,
) -> Path:
    """Write the sheet as a PNG for `identities` (complete in `store`, photos under `input_uri`)."""
    from pv_ray.backbones import load_backbone
    from pv_ray.model.pipeline import VideoPipeline

    records = {i: store.get(i).metadata for i in identities}
    configs = [recorded_adapter_config(m) for m in records.values()]
    pipeline = VideoPipeline.for_adapters(load_backbone(cfg.model), cfg.adapter, configs)
    spec = evaluation_spec(cfg)

    def clip(prompt: str) -> np.ndarray:
        return frames_to_uint8(pipeline(prompt, spec, seed=SHEET_SEED, negative_prompt=cfg.video.negative_prompt))

    base_clips: dict[str, np.ndarray] = {}
    rows = []
    for identity_id, metadata in records.items():
        prompt = evaluation_prompts(metadata.get("class_word", "person"), count=1)[0]
        if prompt not in base_clips:
            with pipeline.base_model():
                base_clips[prompt] = clip(prompt)
        weights = LoraWeights.from_bytes(store.read_weights_bytes(identity_id), source=identity_id)
        pipeline.use_identity(weights, recorded_active_fraction(metadata, cfg.adapter.active_fraction))
        photo = _reference_photo(input_uri, identity_id, cfg, storage_options)
        rows.append(_identity_row(identity_id, prompt, photo, base_clips[prompt], clip(prompt), spec.height, frames))
    return _save_sheet(rows, Path(out_path), list(records))


def _identity_row(identity_id, prompt, photo, base, adapted, size: int, frames: int) -> Image.Image:
    """Label, reference photo, then the base clip's frames above the adapted clip's."""
    label = _label(f"{identity_id}\n\nbase (top)\nadapted (bottom)\n\n{textwrap.fill(prompt, 22)}", 2 * size + PAD)
    base_row, adapted_row = _row(_frames(base, frames), size), _row(_frames(adapted, frames), size)
    clips = Image.new("RGB", (base_row.width, 2 * size + PAD), "white")
    clips.paste(base_row, (0, 0))
    clips.paste(adapted_row, (0, size + PAD))
    photo_cell = Image.new("RGB", (size, 2 * size + PAD), "white")
    photo_cell.paste(photo.resize((size, size)), (0, (size + PAD) // 2))
    return _row([label, photo_cell, clips], 2 * size + PAD)


def _save_sheet(rows: list[Image.Image], out: Path, identities: list[str]) -> Path:
    sheet = Image.new(
        "RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 3 * PAD * (len(rows) - 1)), "white"
    )
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 3 * PAD
    out.parent.mkdir(parents=True, exist_ok=True)
    text = PngInfo()  # who the sheet shows, so `pv-ray delete` knows whether to remove it
    text.add_text(CONTACT_SHEET_IDENTITIES, json.dumps(identities))
    sheet.save(out, pnginfo=text)
    return out

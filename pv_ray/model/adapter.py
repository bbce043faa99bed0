"""The spatial identity adapter: LoRA on the UNet's spatial attention, with an isolation window.

- LoRA (peft) goes only into spatial attention (`*.attentions.J.transformer_blocks.K.attn1`, and
  `attn2` by config), never into `motion_modules`: the temporal layers stay untouched, which is
  what keeps the backbone's motion.
- The isolation window: the adapter contributes only while the denoising timestep lies in the last
  `active_fraction` of the schedule (t < active_fraction * T), where appearance forms. A forward
  pre-hook on the UNet switches the LoRA layers per call, so the window holds for pv-ray's own
  sampler and for any diffusers pipeline that calls this UNet.
- Files are diffusers LoRA files (`pytorch_lora_weights.safetensors`, keys `unet.…lora.down/up`,
  the peft config as metadata so alpha survives), loadable by `AnimateDiffPipeline.load_lora_weights`.
- Swapping identities copies weights into the injected layers: no re-injection, no graph change,
  so one loaded backbone serves or tunes many identities.
- Style LoRAs (`pv_ray.model.styles`) live in the same UNet as further peft adapters; the hook
  routes each LoRA layer per call: the identity adapter inside its window only, the selected
  styles at every step.
- Slots: tuning K identities in one batched rollout (`train.identities_per_batch`) injects K
  identity adapters ("identity", "identity_1", ...) and routes each sample of the UNet batch to
  its identity's slot (peft's mixed-batch forward): one A/B pair per identity, applied per sample.
- The LoRA weights are float32 whatever the backbone's dtype (as diffusers' `cast_training_params`
  does): AdamW on float16 weights underflows to NaN. peft casts each LoRA layer's input to the
  LoRA dtype and its output back, so a float16/bfloat16 backbone stays in its dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from pv_ray.config import AdapterConfig
from pv_ray.errors import InputError
from pv_ray.model.schedule import IsolationWindow
from pv_ray.storage.adapter_folder import WEIGHTS_NAME

ADAPTER_NAME = "identity"
LORA_DTYPE = torch.float32
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft config in the file


class AdapterFileError(InputError):
    """An adapter file that cannot be loaded into this backbone."""


def fitting_config(cfg: AdapterConfig, ranks: Iterable[int] = (), cross_attention: bool = False) -> AdapterConfig:
    """`cfg` widened so that its injected layers hold adapters of every rank in `ranks` (smaller
    ones are zero-padded on load) and, with `cross_attention`, adapters of attn2 too. Validated:
    the ranks may come from files."""
    return AdapterConfig.model_validate(
        {**cfg.model_dump(), "rank": max([cfg.rank, *ranks]), "cross_attention": cfg.cross_attention or cross_attention}
    )


def _timestep_of(args: tuple, kwargs: dict) -> float:
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    if torch.is_tensor(t):
        values = t.flatten()
        if values.numel() > 1 and not bool((values == values[0]).all()):
            # One UNet call switches the adapter as a whole, so a batch must share its timestep.
            raise ValueError("the isolation window needs one timestep per UNet call; got mixed timesteps")
        return float(values[0])
    return float(t)


class IdentityAdapter:
    """LoRA injected into a backbone UNet (diffusers `UNetMotionModel`), reused across identities."""

    def __init__(self, unet: torch.nn.Module, cfg: AdapterConfig, num_train_timesteps: int, slots: int = 1):
        self.unet = unet
        self.cfg = cfg
        self.lora_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, init_lora_weights=True
        )
        self.slots = [slot_name(k) for k in range(slots)]
        for name in self.slots:
            unet.add_adapter(self.lora_config, adapter_name=name)
        self.layers: dict[str, LoraLayer] = {
            n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A
        }
        if not self.layers:
            raise ValueError(f"adapter targets match no module of the UNet: {cfg.target_modules}")
        for layer in self.layers.values():
            for name in self.slots:
                layer.lora_A[name].to(LORA_DTYPE)
                layer.lora_B[name].to(LORA_DTYPE)
            layer.register_forward_pre_hook(self._route_samples, with_kwargs=True)
        self.sample_slots: list[int] | None = None  # per sample of the UNet batch: its slot (batched tuning)
        self._identity_on = False
        self.num_train_timesteps = num_train_timesteps
        self.window = IsolationWindow(cfg.active_fraction, num_train_timesteps)
        self.enabled = True  # master switch: False gives the base model (no second copy of weights)
        self.active_styles: dict[str, float] = {}  # style adapters on at every step -> their scale
        self.refresh_layers()
        self._hook = unet.register_forward_pre_hook(self._apply_window, with_kwargs=True)
        for slot in range(slots):
            self.reset(0, slot)

    # -- parameters ---------------------------------------------------------------------------
    def parameters(self, slot: int = 0) -> list[torch.nn.Parameter]:
        name = slot_name(slot)
        return [p for m in self.layers.values() for d in (m.lora_A, m.lora_B) for p in d[name].parameters()]

    def reset(self, seed: int, slot: int = 0) -> None:
        """Fresh LoRA init (A: kaiming-uniform from `seed`, B: zeros), so the adapter starts as a no-op."""
        name = slot_name(slot)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers.values():
                a = layer.lora_A[name].weight
                a.copy_(torch.nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=gen))
                layer.lora_B[name].weight.zero_()
                layer.scaling[name] = self.cfg.alpha / self.cfg.rank

    # -- the isolation window -------------------------------------------------------------------
    def refresh_layers(self) -> None:
        """Find every LoRA layer of the UNet again (after style LoRAs were injected)."""
        self.all_layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]

    def _apply_window(self, module, args, kwargs):
        identity = self.enabled and self.window.is_active(_timestep_of(args, kwargs))
        self._identity_on = identity
        for layer in self.all_layers:
            names = [ADAPTER_NAME] if identity and ADAPTER_NAME in layer.lora_A else []
            route_lora_layer(layer, names + [n for n in self.active_styles if n in layer.lora_A])
        return None

    def _route_samples(self, layer, args, kwargs):
        """In batched tuning, tell an identity layer which slot each row of its input belongs to."""
        if self.sample_slots is None or not self._identity_on:
            return None
        rows_per_sample = args[0].shape[0] // len(self.sample_slots)  # frames (or pixels) of each sample
        names = [slot_name(s) for s in self.sample_slots for _ in range(rows_per_sample)]
        return args, {**kwargs, "adapter_names": names}

    def use_window(self, active_fraction: float) -> None:
        """Switch to another isolation window (e.g. the one an identity was tuned with)."""
        self.window = IsolationWindow(active_fraction, self.num_train_timesteps)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: the adapter is off at every timestep inside this block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextmanager
    def routing(self, sample_slots: list[int] | None) -> Iterator[None]:
        """Route each sample of the UNet batch to its slot inside this block (None: every sample on
        slot 0). Held over a step's forwards and its backward: gradient checkpointing recomputes
        the forwards during the backward, and they must route as they did the first time."""
        previous, self.sample_slots = self.sample_slots, sample_slots
        try:
            yield
        finally:
            self.sample_slots = previous

    def remove(self) -> None:
        self._hook.remove()

    # -- files --------------------------------------------------------------------------------
    def diffusers_state_dict(self, slot: int = 0) -> dict[str, torch.Tensor]:
        """Weights in diffusers' LoRA naming (`<module>.lora.down.weight` / `.lora.up.weight`)."""
        adapter, out = slot_name(slot), {}
        for name, layer in self.layers.items():
            out[f"{name}.lora.down.weight"] = layer.lora_A[adapter].weight.detach().cpu().contiguous()
            out[f"{name}.lora.up.weight"] = layer.lora_B[adapter].weight.detach().cpu().contiguous()
        return out

    def move_slot(self, source: int, target: int = 0) -> None:
        """Copy one slot's weights into another (after batched tuning: into the served slot 0)."""
        with torch.no_grad():
            for layer in self.layers.values():
                for kind in (layer.lora_A, layer.lora_B):
                    kind[slot_name(target)].weight.copy_(kind[slot_name(source)].weight)

    def save(self, directory: str | Path) -> Path:
        """Write `pytorch_lora_weights.safetensors` in the diffusers LoRA format."""
        from diffusers import AnimateDiffPipeline

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = self.lora_config.to_dict()
        metadata["target_modules"] = self.cfg.target_modules
        AnimateDiffPipeline.save_lora_weights(
            directory,
            unet_lora_layers=self.diffusers_state_dict(),
            unet_lora_adapter_metadata=metadata,
            weight_name=WEIGHTS_NAME,
            safe_serialization=True,
        )
        return directory / WEIGHTS_NAME

    def load(self, path: str | Path) -> None:
        """Swap in the weights of an adapter file (or a folder holding one), in place."""
        state_dict, rank, alpha = read_adapter_file(path)
        self.load_state_dict(state_dict, rank=rank, alpha=alpha)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], *, rank: int, alpha: float) -> None:
        """Copy diffusers-format LoRA weights into the injected layers, in place.

        Every key and shape is checked before any weight is touched (`check_fits`), so a bad file
        leaves the current adapter intact. A smaller rank is zero-padded (the padding adds
        nothing); layers the file does not cover are zeroed, so nothing of the previous identity
        lingers. The file's scaling (alpha / rank) is folded into the up weights and the layers'
        own stays the configured one: nothing but tensor contents changes, so a compiled UNet
        (model.compile) never recompiles. Plain tensor copies: no module walk, no re-injection
        (about 2 ms at SD1.5 size on CPU).
        """
        copies = self._copy_targets(state_dict, rank)
        fold = (alpha / rank) / (self.cfg.alpha / self.cfg.rank)
        with torch.no_grad():
            for layer in self.layers.values():
                if rank < self.cfg.rank:
                    layer.lora_A[ADAPTER_NAME].weight.zero_()
                layer.lora_B[ADAPTER_NAME].weight.zero_()
                layer.scaling[ADAPTER_NAME] = self.cfg.alpha / self.cfg.rank
            for target, value, is_up in copies:
                target.copy_(value * fold if is_up and fold != 1 else value)

    def check_fits(self, state_dict: dict[str, torch.Tensor], rank: int) -> None:
        """Raise AdapterFileError unless every weight fits the injected layers (keys, shapes, rank)."""
        self._copy_targets(state_dict, rank)

    def _copy_targets(
        self, state_dict: dict[str, torch.Tensor], rank: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(slice of an injected weight, file tensor, whether it is an up weight) per key, after
        checking that each fits."""
        if rank > self.cfg.rank:
            raise AdapterFileError(f"adapter rank {rank} exceeds the serving rank {self.cfg.rank} (adapter.rank)")
        copies: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for key, value in state_dict.items():
            module, _, kind = key.removeprefix("unet.").rpartition(".lora.")
            layer = self.layers.get(module)
            if layer is None or kind not in ("down.weight", "up.weight"):
                raise AdapterFileError(f"adapter weight {key!r} does not match this backbone's adapter layers")
            target = (layer.lora_A if kind == "down.weight" else layer.lora_B)[ADAPTER_NAME].weight
            # down is (rank, in_features), up is (out_features, rank): the rank axis is padded.
            expected = (rank, target.shape[1]) if kind == "down.weight" else (target.shape[0], rank)
            if tuple(value.shape) != expected:
                raise AdapterFileError(f"adapter weight {key!r} has shape {tuple(value.shape)}, expected {expected}")
            up = kind == "up.weight"
            copies.append((target[:, :rank] if up else target[:rank], value, up))
        return copies


def slot_name(slot: int) -> str:
    """The peft adapter name of an identity slot (slot 0 is the one that is saved and served)."""
    return ADAPTER_NAME if slot == 0 else f"{ADAPTER_NAME}_{slot}"


def route_lora_layer(layer: LoraLayer, adapter_names: list[str]) -> None:
    """Run exactly `adapter_names` in this LoRA layer (none: the base layer alone).

    peft's public set_adapter / enable / disable also flip requires_grad on the LoRA weights,
    which would silently drop the identity adapter from training; these two attributes of the
    layer switch the forward alone."""
    layer._disable_adapters = not adapter_names
    if adapter_names:
        layer._active_adapter = list(adapter_names)


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """Read a diffusers LoRA safetensors file: (state dict, rank, alpha). Never unpickles."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # safetensors raises several types for a damaged header
        raise AdapterFileError(f"{path}: not a readable safetensors file ({e})") from None
    return _lora_weights(state_dict, meta, str(path))


def read_adapter_bytes(data: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], int, float]:
    """`read_adapter_file` for a file's bytes (e.g. from the adapter store); `source` names it in errors."""
    from safetensors.torch import load

    try:
        state_dict = load(data)  # validates the whole header and every tensor's extent
        # The metadata is in the JSON header: 8 bytes of little-endian length, then the header.
        header_length = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise AdapterFileError(f"{source}: not a readable safetensors file ({e})") from None
    return _lora_weights(state_dict, meta, source)


MAX_ALPHA_PER_RANK = 1e4  # alpha / rank scales every LoRA output: beyond this it is no adapter's


def _lora_weights(
    state_dict: dict[str, torch.Tensor], meta: dict[str, str], source: str
) -> tuple[dict[str, torch.Tensor], int, float]:
    """(state dict, rank, alpha) of a diffusers LoRA file's tensors and metadata, range-checked:
    a rank that is not the tensors' (or not positive), an alpha that is not finite and positive (or absurdly large)
    or a weight that is not finite would make a garbage video or divide by zero."""
    downs = [v for k, v in state_dict.items() if k.endswith(".lora.down.weight")]
    if not downs:
        raise AdapterFileError(f"{source}: no LoRA weights (keys '*.lora.down.weight') in the file")
    tensor_rank = int(downs[0].shape[0])
    rank: int = tensor_rank
    alpha: float = rank  # diffusers' default when the file has no metadata
    if _METADATA_KEY in meta:
        try:
            packed = json.loads(meta[_METADATA_KEY])  # diffusers packs the peft config as "unet.<key>"
            rank, alpha = packed["unet.r"], float(packed["unet.lora_alpha"])
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterFileError(f"{source}: malformed LoRA metadata ({e})") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank != tensor_rank or rank <= 0:
        raise AdapterFileError(f"{source}: LoRA rank {rank!r} is not the weights' rank ({tensor_rank})")
    if not (math.isfinite(alpha) and 0 < alpha <= MAX_ALPHA_PER_RANK * rank):
        raise AdapterFileError(f"{source}: LoRA alpha {alpha!r} is not in (0, {MAX_ALPHA_PER_RANK:g} * rank]")
    for key, value in state_dict.items():
        if key.endswith((".lora.down.weight", ".lora.up.weight")):
            axis = 0 if key.endswith(".down.weight") else -1
            if value.ndim != 2 or value.shape[axis] != tensor_rank:
                raise AdapterFileError(f"{source}: {key} has shape {tuple(value.shape)}, not rank {tensor_rank}")
            if not bool(torch.isfinite(value).all()):
                raise AdapterFileError(f"{source}: {key} holds values that are not finite")
    return state_dict, rank, alpha

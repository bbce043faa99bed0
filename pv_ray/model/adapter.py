"""The identity adapter: LoRA on a backbone's denoiser, with an isolation window, for every family.

- LoRA (peft) goes only into the modules the backbone names (`VideoBackbone.adapter_targets`): on
  AnimateDiff spatial attention (`*.attentions.J.transformer_blocks.K.attn1`, and `attn2` by
  config), never `motion_modules`: the temporal layers stay untouched, which is what keeps the
  backbone's motion.
- The isolation window: the adapter contributes only while the denoising timestep lies in the last
  `active_fraction` of the schedule (t < active_fraction * T), where appearance forms. A forward
  pre-hook on the denoiser switches the LoRA layers per call, so the window holds for pv-ray's own
  sampler and for any diffusers pipeline that calls this denoiser.
- Weights leave and enter as `LoraWeights` (diffusers LoRA naming, keys `<component>.…lora.down/up`,
  the peft config so alpha survives), which `AdapterFolder` writes as a file that the family's
  diffusers pipeline (`AnimateDiffPipeline.load_lora_weights`) loads.
- Swapping identities copies weights into the injected layers: no re-injection, no graph change,
  so one loaded backbone serves or tunes many identities.
- Style LoRAs (`pv_ray.model.animatediff.styles`) live in the same denoiser as further peft adapters; the hook
  routes each LoRA layer per call: the identity adapter inside its window only, the selected
  styles at every step.
- Slots: tuning K identities in one batched rollout (`train.identities_per_batch`) injects K
  identity adapters ("identity", "identity_1", ...) and routes each sample of the denoiser batch to
  its identity's slot (peft's mixed-batch forward): one A/B pair per identity, applied per sample.
- The LoRA weights are float32 whatever the backbone's dtype (as diffusers' `cast_training_params`
  does): AdamW on float16 weights underflows to NaN. peft casts each LoRA layer's input to the
  LoRA dtype and its output back, so a float16/bfloat16 backbone stays in its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from pv_ray.config import AdapterConfig
from pv_ray.schedule import IsolationWindow
from pv_ray.storage.adapter_folder import AdapterFileError, LoraWeights

if TYPE_CHECKING:
    from pv_ray.model.protocol import VideoBackbone

ADAPTER_NAME = "identity"
LORA_DTYPE = torch.float32


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
            # One denoiser call switches the adapter as a whole, so a batch must share its timestep.
            raise ValueError("the isolation window needs one timestep per denoiser call; got mixed timesteps")
        return float(values[0])
    return float(t)


class IdentityAdapter:
    """LoRA injected into a backbone's denoiser, reused across identities (`IdentityAdapter.on`)."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        cfg: AdapterConfig,
        num_train_timesteps: int,
        *,
        target_modules: str,
        component: str,
        slots: int = 1,
    ):
        """LoRA of `cfg`'s rank on the modules of `denoiser` that `target_modules` (a peft regex)
        matches; `component` is the denoiser's diffusers name, the prefix of the weights' keys."""
        self.denoiser = denoiser
        self.cfg = cfg
        self.target_modules = target_modules
        self.component = component
        self.lora_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=target_modules, init_lora_weights=True
        )
        self.slots = [slot_name(k) for k in range(slots)]
        for name in self.slots:
            denoiser.add_adapter(self.lora_config, adapter_name=name)
        self.layers: dict[str, LoraLayer] = {
            n: m for n, m in denoiser.named_modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A
        }
        if not self.layers:
            raise ValueError(f"adapter targets match no module of the {component}: {target_modules}")
        for layer in self.layers.values():
            for name in self.slots:
                layer.lora_A[name].to(LORA_DTYPE)
                layer.lora_B[name].to(LORA_DTYPE)
            layer.register_forward_pre_hook(self._route_samples, with_kwargs=True)
        self.sample_slots: list[int] | None = None  # per sample of the denoiser batch: its slot (batched tuning)
        self._identity_on = False
        self.num_train_timesteps = num_train_timesteps
        self.window = IsolationWindow(cfg.active_fraction, num_train_timesteps)
        self.enabled = True  # master switch: False gives the base model (no second copy of weights)
        self.active_styles: dict[str, float] = {}  # style adapters on at every step -> their scale
        self.refresh_layers()
        self._hook = denoiser.register_forward_pre_hook(self._apply_window, with_kwargs=True)
        for slot in range(slots):
            self.reset(0, slot)

    @classmethod
    def on(cls, backbone: VideoBackbone, cfg: AdapterConfig, slots: int = 1) -> IdentityAdapter:
        """The adapter `cfg` describes, injected into `backbone`'s denoiser on the modules it names."""
        return cls(
            backbone.denoiser, cfg, backbone.num_train_timesteps, target_modules=backbone.adapter_targets(cfg),
            component=backbone.lora_component, slots=slots,
        )  # fmt: skip

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
        """Find every LoRA layer of the denoiser again (after style LoRAs were injected)."""
        self.all_layers = [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]

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
        """Route each sample of the denoiser batch to its slot inside this block (None: every sample on
        slot 0). Held over a step's forwards and its backward: gradient checkpointing recomputes
        the forwards during the backward, and they must route as they did the first time."""
        previous, self.sample_slots = self.sample_slots, sample_slots
        try:
            yield
        finally:
            self.sample_slots = previous

    def remove(self) -> None:
        self._hook.remove()

    # -- weights ------------------------------------------------------------------------------
    def weights(self, slot: int = 0) -> LoraWeights:
        """A slot's weights in diffusers' LoRA naming (`<component>.<module>.lora.down.weight` / `.lora.up.weight`)."""
        adapter, tensors, prefix = slot_name(slot), {}, self.component
        for name, layer in self.layers.items():
            tensors[f"{prefix}.{name}.lora.down.weight"] = layer.lora_A[adapter].weight.detach().cpu().contiguous()
            tensors[f"{prefix}.{name}.lora.up.weight"] = layer.lora_B[adapter].weight.detach().cpu().contiguous()
        peft_config = {**self.lora_config.to_dict(), "target_modules": self.target_modules}
        return LoraWeights(tensors, self.cfg.rank, self.cfg.alpha, prefix, peft_config)

    def move_slot(self, source: int, target: int = 0) -> None:
        """Copy one slot's weights into another (after batched tuning: into the served slot 0)."""
        with torch.no_grad():
            for layer in self.layers.values():
                for kind in (layer.lora_A, layer.lora_B):
                    kind[slot_name(target)].weight.copy_(kind[slot_name(source)].weight)

    def load_weights(self, weights: LoraWeights) -> None:
        """Copy an adapter's weights into the injected layers (slot 0), in place.

        Every key and shape is checked before any weight is touched (`check_fits`), so a bad file
        leaves the current adapter intact. A smaller rank is zero-padded (the padding adds
        nothing); layers the file does not cover are zeroed, so nothing of the previous identity
        lingers. The file's scaling (alpha / rank) is folded into the up weights and the layers'
        own stays the configured one: nothing but tensor contents changes, so a compiled denoiser
        (model.compile) never recompiles. Plain tensor copies: no module walk, no re-injection
        (about 2 ms at SD1.5 size on CPU).
        """
        copies = self._copy_targets(weights)
        fold = (weights.alpha / weights.rank) / (self.cfg.alpha / self.cfg.rank)
        with torch.no_grad():
            for layer in self.layers.values():
                if weights.rank < self.cfg.rank:
                    layer.lora_A[ADAPTER_NAME].weight.zero_()
                layer.lora_B[ADAPTER_NAME].weight.zero_()
                layer.scaling[ADAPTER_NAME] = self.cfg.alpha / self.cfg.rank
            for target, value, is_up in copies:
                target.copy_(value * fold if is_up and fold != 1 else value)

    def check_fits(self, weights: LoraWeights) -> None:
        """Raise AdapterFileError unless every weight fits the injected layers (keys, shapes, rank)."""
        self._copy_targets(weights)

    def _copy_targets(self, weights: LoraWeights) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(slice of an injected weight, file tensor, whether it is an up weight) per key, after
        checking that each fits."""
        rank = weights.rank
        if rank > self.cfg.rank:
            raise AdapterFileError(f"adapter rank {rank} exceeds the serving rank {self.cfg.rank} (adapter.rank)")
        copies: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for key, value in weights.tensors.items():
            module, _, kind = key.removeprefix(f"{self.component}.").rpartition(".lora.")
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

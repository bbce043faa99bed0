"""Text embeddings of known prompts, computed once per batch job: `PromptEmbeddings`.

Wan's text encoder (UMT5-XXL) has 5.7 B parameters, more than the 1.3B transformer it conditions.
The prompts a batch job's identities train and are evaluated on are known before any worker starts
(the shipped or configured prompts, per class word), so the driver encodes them once and stores the
rows beside the output; a worker whose prompts are all there never loads the text encoder. A row is
trimmed to its prompt's tokens (the rest of the padded sequence is zeros, added back on use), and
the file names the weights fingerprint it was made with, so it never conditions another backbone.
"""

from __future__ import annotations

import json

import torch

from pv_ray.storage.adapter_folder import safetensors_header

FORMAT = "pv-ray prompt embeddings 1"


class PromptEmbeddingsError(ValueError):
    """A prompt embeddings file that cannot be used (unreadable, or made with other weights)."""


class PromptEmbeddings:
    """Prompt -> its embedding rows (tokens, D), trimmed to the prompt's tokens."""

    def __init__(self, rows: dict[str, torch.Tensor], fingerprint: str):
        self.rows = rows
        self.fingerprint = fingerprint  # the text encoder's backbone's weights fingerprint

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def covers(self, prompts: list[str]) -> bool:
        return all(p in self.rows for p in prompts)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        prompts = list(self.rows)
        tensors = {str(i): self.rows[p].contiguous().cpu() for i, p in enumerate(prompts)}
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "prompts": json.dumps(prompts)}
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> PromptEmbeddings:
        """The rows of a file written by `to_bytes` (the backbone that takes them checks the fingerprint)."""
        from safetensors.torch import load

        try:
            tensors = load(data)
            header = safetensors_header(data).get("__metadata__", {})
            prompts = json.loads(header["prompts"])
        except Exception as e:  # any unreadable file is one precise error
            raise PromptEmbeddingsError(f"prompt embeddings file is unreadable ({type(e).__name__}: {e})") from None
        if header.get("format") != FORMAT or len(prompts) != len(tensors):
            raise PromptEmbeddingsError("prompt embeddings file is not in pv-ray's format")
        return cls({p: tensors[str(i)] for i, p in enumerate(prompts)}, str(header.get("fingerprint")))

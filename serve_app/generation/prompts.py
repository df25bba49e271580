"""Text-encoder outputs, cached by prompt.

Encoding a prompt is a full text-encoder forward (4.5 ms for the tiny model on a CPU, more
for a real CLIP) and users repeat prompts: the same negative prompt on every job, the
same prompt at several seeds, retries. The embeddings depend only on the prompt, the
negative prompt and whether guidance is on, so they are cached, least recently used
first out, and handed to the pipeline as `prompt_embeds`: the pipeline repeats them per
image exactly as it repeats the embeddings it encodes itself, so images are unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers import DiffusionPipeline

# Two (77 x 768) float tensors per entry for SD 1.5: about 0.5 MB; 64 entries, 30 MB.
CACHE_SIZE = 64

Embeddings = tuple[torch.Tensor, torch.Tensor | None]


class PromptCache:
    """One model's prompt embeddings (SD-style `encode_prompt` pipelines)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str, bool], Embeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def embeddings(self, pipe: DiffusionPipeline, prompt: str, negative_prompt: str,
                   guidance: bool) -> Embeddings:
        """(prompt embeddings, negative embeddings or None without guidance), one row."""
        key = (prompt, negative_prompt, guidance)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(
                prompt, pipe._execution_device, 1, guidance,
                negative_prompt=negative_prompt or None,
            )
        entry = (positive, negative if guidance else None)
        self._entries[key] = entry
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

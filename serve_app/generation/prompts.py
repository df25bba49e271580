"""Text-encoder outputs, cached by prompt.

Encoding a prompt is a full text-encoder forward (4.5 ms for the tiny model on a CPU, more
for a real CLIP, much more for FLUX's T5) and users repeat prompts: the same negative prompt
on every job, the same prompt at several seeds, retries. The embeddings depend only on the
prompt, the negative prompt and whether guidance is on, so they are cached, least recently
used first out, and handed to the pipeline as its `*_embeds` kwargs (which ones depends on
the family: `serve_app.generation.families`): the pipeline repeats them per image exactly as
it repeats the embeddings it encodes itself, so images are unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

# Two (77 x 768) float tensors per entry for SD 1.5: about 0.5 MB; 64 entries, 30 MB.
# SDXL's (77 x 2048) pairs are ~1.3 MB, FLUX's (512 x 4096) T5 sequence 8 MB in float32.
CACHE_SIZE = 64

Embeddings = dict[str, torch.Tensor]
Encoder = Callable[[str, str, bool], Embeddings]


class PromptCache:
    """One model's prompt embeddings; `encode(prompt, negative_prompt, guidance)` makes
    them (one row per tensor) on a miss."""

    def __init__(self, encode: Encoder, size: int = CACHE_SIZE) -> None:
        self._encode = encode
        self._size = size
        self._entries: OrderedDict[tuple[str, str, bool, Hashable], Embeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def embeddings(self, prompt: str, negative_prompt: str, guidance: bool,
                   variant: Hashable = ()) -> Embeddings:
        """`variant` is what else the encoders' output depends on (the active LoRAs)."""
        key = (prompt, negative_prompt, guidance, variant)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        with torch.no_grad():
            entry = self._encode(prompt, negative_prompt, guidance)
        self._entries[key] = entry
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

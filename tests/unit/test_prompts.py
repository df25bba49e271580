"""PromptCache: embeddings by (prompt, negative prompt, guidance), least recently used out."""

from __future__ import annotations

import torch

from serve_app.generation.prompts import Embeddings, PromptCache


class CountingEncoder:
    def __init__(self) -> None:
        self.encoded: list[tuple[str, str, bool]] = []

    def __call__(self, prompt: str, negative_prompt: str, guidance: bool) -> Embeddings:
        self.encoded.append((prompt, negative_prompt, guidance))
        out = {"prompt_embeds": torch.full((1, 2), float(len(prompt)))}
        if guidance:
            out["negative_prompt_embeds"] = torch.zeros(1, 2)
        return out


def test_hits_skip_the_encoder_and_keys_separate_what_changes_the_embeddings() -> None:
    encoder = CountingEncoder()
    cache = PromptCache(encoder, size=8)
    first = cache.embeddings("a cat", "", True)
    assert cache.embeddings("a cat", "", True) is first
    cache.embeddings("a cat", "blurry", True)
    unguided = cache.embeddings("a cat", "", False)
    assert set(unguided) == {"prompt_embeds"}
    assert encoder.encoded == [("a cat", "", True), ("a cat", "blurry", True),
                               ("a cat", "", False)]
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 3)


def test_the_least_recently_used_entry_goes_first() -> None:
    encoder = CountingEncoder()
    cache = PromptCache(encoder, size=2)
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        cache.embeddings(prompt, "", True)
    cache.embeddings("a", "", True)
    cache.embeddings("b", "", True)
    assert [p for p, _, _ in encoder.encoded] == ["a", "b", "c", "b"]

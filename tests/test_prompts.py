"""PromptCache: embeddings by (prompt, negative prompt, guidance), least recently used out."""

from __future__ import annotations

from typing import Any

import torch

from serve_app.generation.prompts import PromptCache


class CountingPipe:
    _execution_device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded: list[tuple[Any, ...]] = []

    def encode_prompt(self, prompt: str, device: torch.device, n: int, guidance: bool,
                      negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoded.append((prompt, negative_prompt, guidance))
        return torch.full((n, 2), float(len(prompt))), torch.zeros(n, 2)


def test_hits_skip_the_encoder_and_keys_separate_what_changes_the_embeddings() -> None:
    pipe, cache = CountingPipe(), PromptCache(size=8)
    first = cache.embeddings(pipe, "a cat", "", True)  # type: ignore[arg-type]
    assert cache.embeddings(pipe, "a cat", "", True) is first  # type: ignore[arg-type]
    cache.embeddings(pipe, "a cat", "blurry", True)  # type: ignore[arg-type]
    unguided = cache.embeddings(pipe, "a cat", "", False)  # type: ignore[arg-type]
    assert unguided[1] is None
    assert pipe.encoded == [("a cat", None, True), ("a cat", "blurry", True),
                            ("a cat", None, False)]
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 3)


def test_the_least_recently_used_entry_goes_first() -> None:
    pipe, cache = CountingPipe(), PromptCache(size=2)
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        cache.embeddings(pipe, prompt, "", True)  # type: ignore[arg-type]
    cache.embeddings(pipe, "a", "", True)  # type: ignore[arg-type]
    cache.embeddings(pipe, "b", "", True)  # type: ignore[arg-type]
    assert [p for p, _, _ in pipe.encoded] == ["a", "b", "c", "b"]

"""A CLIP BPE tokenizer built offline for the shapes world: every word of the world's
vocabulary (and of a list of common English words) is one token; any other text still
tokenizes, byte by byte with whatever merges apply (CLIP's byte-level fallback).

Contract:
- `build_tokenizer_files(folder)` writes `vocab.json` and `merges.txt` in CLIP's format
  (byte-level alphabet, `</w>` word ends, `#version: 0.2` header), which
  `CLIPTokenizer.from_pretrained` (and so `StableDiffusionPipeline.from_pretrained`) reads.
- `load_tokenizer(folder)` returns a `CLIPTokenizer` with `model_max_length` 77.
- Deterministic: the merges are learned by plain BPE over a fixed word list, ties broken by
  the pair's text, so the files are byte-identical on every machine.
Why BPE learned over the words (not a merge chain per word written by hand): merges of one
word would otherwise split another (the pair "r e" of "red" inside "green"); BPE's rank
order makes every training word come out whole.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from serve_app.training.world import vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
# Words people put in such prompts beyond the world's own: one token each, so they cost
# the model one position, and it learns (from the captions' filler) to ignore them.
COMMON_WORDS = (
    "i", "you", "it", "is", "are", "be", "with", "without", "for", "by", "at", "as", "from",
    "into", "onto", "make", "generate", "create", "render", "paint", "put", "place", "give",
    "want", "like", "some", "this", "there", "here", "side", "corner", "upper", "lower",
    "color", "colour", "colours", "colors", "dark", "light", "solid", "filled", "empty",
    "canvas", "backdrop", "scene", "illustration", "icon", "logo", "sketch", "painting",
    "photograph", "high", "quality", "detailed", "and", "or", "not", "no", "its", "his", "her",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def words() -> list[str]:
    """The words that must be single tokens."""
    return sorted(set(vocabulary()) | set(COMMON_WORDS))


def learn_merges(word_list: list[str]) -> list[tuple[str, str]]:
    """BPE over `word_list` (each word counted once) until every word is one symbol."""
    table = bytes_to_unicode()
    segmented = []
    for word in word_list:
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        segmented.append(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in segmented:
            for pair in itertools.pairwise(symbols):
                pairs[pair] += 1
        if not pairs:
            return merges
        # Most frequent first; ties by text, for byte-identical output everywhere.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        segmented = [_merge(symbols, best) for symbols in segmented]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(words())
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def build_tokenizer_files(folder: Path) -> Path:
    """Write `vocab.json` + `merges.txt` into `folder` (created); returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    vocab = json.loads((Path(folder) / "vocab.json").read_text())
    lines = (Path(folder) / "merges.txt").read_text().splitlines()[1:]
    # Without model_max_length, padding to max length (what SD pipelines do) breaks.
    merges = [tuple(m.split(" ")) for m in lines if m]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    return load_tokenizer(build_tokenizer_files(folder))

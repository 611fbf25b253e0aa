"""Decontamination: training prompts that share an n-gram of words with an evaluation prompt.

A benchmark score means little when its questions were trained on (alignment-handbook's loader pools train and test
splits; users found out). Before any training stage reads its prompts, they are screened against every evaluation
prompt (each MT-Bench turn, each pairwise instruction): lower-cased words (``\\w+``), and a training prompt is
contaminated when it contains any n consecutive words of an evaluation prompt, or the whole of one shorter than n
words (from ``MIN_WORDS`` words up; shorter ones would match common phrases). The count goes into the stage's
counts; with ``drop`` the prompt goes to the stage's rejects, its reason naming the evaluation prompt and the words.

The evaluation hands its prompts to ``Screen.build`` (``evaluate.sets.training_screen``): this module knows nothing
of how they are read. Written by hand: an exact n-gram set lookup is a few lines, and the libraries that do it (MinHash dedup tools) answer
a fuzzier question.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

WORD = re.compile(r"\w+")
MIN_WORDS = 4


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass(frozen=True)
class Hit:
    item: str  # which evaluation prompt, e.g. "mt_bench 81 turn 1"
    words: str  # the shared words


@dataclass(frozen=True)
class Screen:
    """The n-grams of the evaluation prompts, each mapped to the prompt it came from (small: shipped to workers)."""

    n: int
    drop: bool
    grams: dict[tuple[str, ...], str]
    lengths: tuple[int, ...]  # n, and the lengths of evaluation prompts shorter than n words

    @classmethod
    def build(cls, prompts: Iterable[tuple[str, str]], n: int, drop: bool = False) -> Screen:
        """``prompts``: (name, text) of every evaluation prompt."""
        grams: dict[tuple[str, ...], str] = {}
        for item, text in prompts:
            tokens = words(text)
            if len(tokens) < n:
                if len(tokens) >= MIN_WORDS:
                    grams.setdefault(tuple(tokens), item)
                continue
            for start in range(len(tokens) - n + 1):
                grams.setdefault(tuple(tokens[start:start + n]), item)
        return cls(n=n, drop=drop, grams=grams, lengths=tuple(sorted({len(g) for g in grams}, reverse=True)))

    def match(self, text: str) -> Hit | None:
        """The first evaluation prompt ``text`` overlaps, with the shared words; None when it is clean."""
        tokens = words(text)
        for length in self.lengths:
            for start in range(len(tokens) - length + 1):
                item = self.grams.get(tuple(tokens[start:start + length]))
                if item is not None:
                    return Hit(item, " ".join(tokens[start:start + length]))
        return None

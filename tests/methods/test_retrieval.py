"""BM25 retrieval over one user's history: the best items first, nothing outside the list, and no log
lines of the library's own on a console."""

from __future__ import annotations

import logging

from tailorlm.data.schema import HistoryItem
from tailorlm.methods.retrieval import BM25Retriever

ITEMS = [
    HistoryItem("1", "a bus fails to stop for me"),
    HistoryItem("2", "the grocery store closes"),
    HistoryItem("3", "the operator disconnects me"),
]


def test_bm25_ranks_the_items_sharing_the_querys_words_first():
    found = BM25Retriever().top_k("the grocery store was closed", ITEMS, 2)
    assert found[0].id == "2" and len(found) == 2 and {i.id for i in found} <= {"1", "2", "3"}
    assert BM25Retriever().top_k("anything", [], 3) == [] and BM25Retriever().top_k("bus", ITEMS, 0) == []


def test_building_an_index_logs_nothing_below_a_warning(caplog):
    # rouge-score's absl gives the root logger a stderr handler at the first ROUGE score; bm25s's own
    # logger is DEBUG, so every query of a bench run printed "DEBUG:bm25s:Building index from tokens".
    caplog.set_level(logging.DEBUG)
    BM25Retriever().top_k("the bus", ITEMS, 1)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bm25s")] == []

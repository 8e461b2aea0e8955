"""Opening an index a second time in the same process leaves the first connection whole. SQLite's locks
are POSIX locks, held per process: closing any descriptor of the file drops all of them. Another process
that then writes and closes believes it was the last connection, folds the write-ahead log away, and the
first connection reads stale data or fails with "disk I/O error" (SQLite's "How To Corrupt An SQLite
Database File", 2.2). The index must never open and close the file behind a live connection."""

from __future__ import annotations

import subprocess
import sys

from tailorlm.store.index import HistoryRecord, StoreIndex

WRITER = """
import sys
from tailorlm.store.index import HistoryRecord, StoreIndex
index = StoreIndex(sys.argv[1])
index.add_history("ann", [HistoryRecord(sys.argv[2], "from another process", "no")])
index.close()
"""


def test_a_second_index_on_the_same_file_breaks_nothing(tmp_path):
    path = tmp_path / "index.sqlite"
    first = StoreIndex(path)
    first.add_history("ann", [HistoryRecord("a0", "x", "yes")])
    expected = ["a0"]
    for round_ in range(3):
        StoreIndex(path).close()  # a second index in this process (a CLI command, a worker's store)
        subprocess.run([sys.executable, "-c", WRITER, str(path), f"p{round_}"], check=True, timeout=120)
        expected.append(f"p{round_}")
        assert [record.item_id for record in first.history("ann")] == expected
        first.add_history("ann", [HistoryRecord(f"a{round_ + 1}", "x", "yes")])
        expected.append(f"a{round_ + 1}")
    first.close()
    fresh = StoreIndex(path)
    assert [record.item_id for record in fresh.history("ann")] == expected
    fresh.close()

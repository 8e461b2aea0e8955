"""PAG profiles: written once per user in batches, each batch heard as progress (a run writes them for
minutes on a CPU), and a user whose profile is kept is not written again (tiny model)."""

from __future__ import annotations

from tailorlm.data import load_task
from tailorlm.engine.engine import Engine
from tailorlm.kinds.lora import LoraSpec
from tailorlm.methods.profiles import Profiles, ProfileWriter


def test_profiles_are_written_in_batches_each_heard_and_kept(make_base, tmp_path):
    task = load_task("verbagg")
    users = task.users[:3]
    engine = Engine(make_base(), LoraSpec(), slots=2)
    writer = ProfileWriter(engine, task, tmp_path / "profiles.json", items=3, max_new_tokens=4)
    heard: list[tuple[int, int]] = []
    written = writer.profiles(
        users, batch_size=2, on_progress=lambda done, total: heard.append((done, total))
    )
    assert sorted(written) == sorted(u.id for u in users)
    assert heard == [(2, 3), (3, 3)]
    heard.clear()
    assert writer.profiles(users, batch_size=2, on_progress=lambda *report: heard.append(report)) == written
    assert heard == []  # nothing missing: nothing written, nothing to hear

    labels: list[str] = []

    def progress(label: str):
        labels.append(label)
        return lambda done, total: heard.append((done, total))

    source = Profiles(
        task, lambda: engine, tmp_path / "again.json", items=3, max_new_tokens=4, progress=progress
    )
    source.ensure(users)
    assert labels == ["profiles of 3 users"] and heard[-1] == (3, 3)
    source.ensure(users)  # kept in memory: no second piece of work
    assert labels == ["profiles of 3 users"]

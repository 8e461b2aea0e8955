"""A store's settings: a label fit under its earlier name still means the same fit."""

from __future__ import annotations

import json

import pytest

from tailorlm.users.errors import UserError
from tailorlm.users.settings import ServiceSettings, check_label_fit


def test_a_store_configured_under_a_fits_former_name_reads_its_current_one():
    """``choice`` was ``select``'s name: a store whose settings say it fits the same way."""
    written = json.dumps({**json.loads(ServiceSettings().to_json()), "label_fit": "choice"})
    assert ServiceSettings.from_json(written).label_fit == "select"
    assert check_label_fit("choice") == "select"
    assert check_label_fit("fusion") == "fusion"
    with pytest.raises(UserError, match="'chosen' is not one of bias, fusion, select"):
        check_label_fit("chosen")


def test_a_kind_with_a_shared_part_is_refused_by_name_not_stored_untrained(tmp_path):
    """A collab module needs its task's trained MLP, which a users store does not keep: asking a store for
    one is a one-line error, before any user or setting is written."""
    from tailorlm import models
    from tailorlm.users.service import UserService

    service = UserService(tmp_path / "store")
    service.configure(task="bfi", base_model=models.TINY_MODEL)
    with pytest.raises(UserError, match="collab modules need their task's trained shared part"):
        service.add("alice", "collab")
    with pytest.raises(UserError, match="shared part"):
        service.configure(kind="collab")
    assert service.list_users() == []
    service.close()

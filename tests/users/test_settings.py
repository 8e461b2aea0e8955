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

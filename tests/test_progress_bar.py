"""LogProgress's evaluation lines: validation, test and predict share one set of hooks (talr.progress_bar)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from talr.progress_bar import LogProgress


@pytest.mark.parametrize("loop", ["test", "predict"])
def test_test_and_predict_log_like_validation(loop, caplog):
    bar = LogProgress(every_s=0.0)  # every batch logs
    trainer = SimpleNamespace(**{f"num_{loop}_batches": [2, 1]})
    with caplog.at_level(logging.INFO, logger="talr.progress"):
        getattr(bar, f"on_{loop}_start")(trainer, None)
        for i in range(3):
            getattr(bar, f"on_{loop}_batch_end")(trainer, None, None, None, i)
        getattr(bar, f"on_{loop}_end")(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "talr.progress"]
    assert lines[0] == f"{loop}: 3 batches"
    assert [line.split(":")[1].split()[0] for line in lines[1:4]] == ["1/3", "2/3", "3/3"]
    assert lines[4].startswith(f"{loop} done in ")
    assert len(lines) == 5

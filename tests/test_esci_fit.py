"""A fit on the ESCI fixture (official two-parquet layout) reports accuracy, macro-F1 and per-class F1."""

from __future__ import annotations

from esci_fixture import write_esci
from helpers import fit_config, read_metrics, series

from talr.cli import main


def test_fit_on_esci_fixture_reports_all_metrics(tmp_path, tiny_model_dir):
    folder = write_esci(tmp_path / "esci")
    cfg = fit_config(tmp_path, tiny_model_dir, str(folder), trainer={"max_steps": 2, "val_check_interval": 2},
                     data={"max_length": 512})
    text = cfg.read_text().replace("talr.tasks.MedCalc", "talr.tasks.ESCI")
    cfg.write_text(text)
    main(["fit", "--config", str(cfg)])
    rows = read_metrics(tmp_path)
    for key in ("val/accuracy", "val/macro_f1", "val/f1_E", "val/f1_S", "val/f1_C", "val/f1_I", "val/unparseable"):
        values = series(rows, key)
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), key  # baseline + after step 2
    # a random tiny model never writes "Answer: <label>": every answer is unparseable, hence wrong
    assert series(rows, "val/unparseable") == [1.0, 1.0] and series(rows, "val/accuracy") == [0.0, 0.0]
    main(["test", "--config", str(cfg)])
    assert series(read_metrics(tmp_path), "test/accuracy") == [0.0]

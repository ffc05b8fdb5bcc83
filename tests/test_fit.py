"""End-to-end `fit` through the CLI on a tiny random model: loss goes down, baseline is logged."""

from __future__ import annotations

from helpers import fit_config, read_metrics, series

from talr.cli import main


def test_fit_reduces_loss_on_repeated_batch(tmp_path, tiny_model_dir, medcalc_csv):
    cfg = fit_config(tmp_path, tiny_model_dir, str(medcalc_csv),
                     trainer={"max_steps": 12, "overfit_batches": 1, "limit_val_batches": 0},
                     method_args={"lr": 1e-2, "warmup_ratio": 0.0, "baseline_eval": False})
    main(["fit", "--config", str(cfg)])
    loss = series(read_metrics(tmp_path), "train/loss")
    assert len(loss) == 12
    assert loss[-1] < 0.8 * loss[0], loss


def test_fit_logs_baseline_then_validation(tmp_path, tiny_model_dir, medcalc_csv):
    cfg = fit_config(tmp_path, tiny_model_dir, str(medcalc_csv), trainer={"max_steps": 2, "val_check_interval": 2})
    main(["fit", "--config", str(cfg)])
    rows = read_metrics(tmp_path)
    baseline = [r for r in rows if r.get("baseline/val/acc")]
    assert len(baseline) == 1 and int(baseline[0]["step"]) == 0
    val_nll = series(rows, "val/nll")
    assert len(val_nll) == 2  # baseline + the validation after step 2
    assert series(rows, "val/n") == [4.0, 4.0]
    assert series(rows, "train/lr") and series(rows, "train/tokens_per_s")

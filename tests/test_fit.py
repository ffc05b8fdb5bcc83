"""End-to-end `fit` through the CLI on a tiny random model: loss goes down, baseline is logged."""

from __future__ import annotations

import pytest
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


def test_padding_share_is_logged_exactly(tiny_model_dir, medcalc_csv):
    """train/padding_share = padded positions / all positions of the batch, from the examples' own lengths."""
    import lightning.pytorch as L

    from talr.data.datamodule import DomainDataModule
    from talr.methods import SFT
    from talr.tasks.medcalc import MedCalc

    class Record(L.Callback):
        seen: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lengths = {e["index"]: len(e["input_ids"]) for e in trainer.datamodule.examples["train"]}
            rows = [lengths[i] for i in batch["index"].tolist()]
            self.seen.append((1 - sum(rows) / (len(rows) * max(rows)), float(trainer.callback_metrics["train/padding_share"])))

    task = MedCalc(source=str(medcalc_csv), format="label", max_examples={"train": 8, "validation": 2, "test": 2})
    dm = DomainDataModule(task=task, tokenizer=str(tiny_model_dir), max_length=1024, batch_size=4)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(SFT(pretrained=str(tiny_model_dir), baseline_eval=False, generate_in_eval=False), dm)
    assert len(record.seen) == 2
    for expected, logged in record.seen:
        assert logged == pytest.approx(expected, abs=1e-6)
    assert any(expected > 0 for expected, _ in record.seen)  # real notes differ in length

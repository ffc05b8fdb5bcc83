"""A run's output holds no third-party noise: no Lightning tips ("💡 Tip: … litlogger"), no deprecation warning that
Lightning's own code triggers in torch (`isinstance(treespec, LeafSpec)`), no model-summary FLOPs column (always 0:
there is no example input) — and a one-line model summary instead."""

from __future__ import annotations

import subprocess
import sys
import warnings

from helpers import fit_config

from talr.callbacks.quiet_startup import quiet_third_party


def test_lightnings_pytree_deprecation_is_silenced_at_its_source():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    def leafspec_warnings(quiet: bool) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_third_party()
            _tree_flatten(1.0)  # Lightning 2.6 builds a LeafSpec here, deprecated by torch 2.13
        return [w for w in caught if "LeafSpec" in str(w.message)]

    assert leafspec_warnings(quiet=False)  # the source, so that the test fails if it moves
    assert not leafspec_warnings(quiet=True)


def test_peft_deprecation_is_silenced(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def deprecations(quiet: bool) -> list:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_third_party()
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))  # what LoRA.prepare_model does
        return [w for w in caught if "is_gradient_checkpointing" in str(w.message)]

    assert deprecations(quiet=False)
    assert not deprecations(quiet=True)


def test_fit_output_has_no_tips_warnings_or_flops(tmp_path, tiny_model_dir):
    config = fit_config(tmp_path, tiny_model_dir, "synthetic",
                        trainer={"max_steps": 1, "enable_model_summary": True, "limit_val_batches": 0},
                        method_args={"baseline_eval": False})
    run = subprocess.run([sys.executable, "-m", "talr", "fit", "--config", str(config)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "Tip:" not in output and "litlogger" not in output
    assert "LeafSpec" not in output
    assert "FLOPs" not in output and "Flops" not in output
    assert "configure_callbacks" not in output  # nor Lightning's notice that our summary replaced its own
    assert "model: LlamaForCausalLM, 1.6 M parameters, 1.6 M trainable (100.0%)" in output

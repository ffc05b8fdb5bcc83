"""The module's public interface to callbacks (talr.methods.sft's docstring): no callback reads or writes a
private attribute of the LightningModule, and the documented attributes exist and hold what they say."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import talr
from talr.token_stats import TokenLosses

TALR = Path(talr.__file__).parent
CALLBACK_SOURCES = sorted([*TALR.glob("callbacks/*.py"), *TALR.glob("general/*.py"), TALR / "chat.py"])
MODULE_NAMES = {"pl_module", "module", "lightning_module"}


def private_module_attributes(path: Path) -> list[str]:
    """`pl_module._x` (and `getattr(pl_module, "_x")`) in a source file, as `file:line name`."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in MODULE_NAMES:
            name = node.attr
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in MODULE_NAMES
              and isinstance(node.args[1], ast.Constant)):
            name = node.args[1].value
        else:
            continue
        if isinstance(name, str) and name.startswith("_"):
            hits.append(f"{path.name}:{node.lineno} {name}")
    return hits


def test_the_checker_finds_private_reads(tmp_path):
    sample = tmp_path / "cb.py"
    sample.write_text("def f(pl_module):\n    x = pl_module._last\n    return getattr(pl_module, '_y', None)\n")
    assert private_module_attributes(sample) == ["cb.py:2 _last", "cb.py:3 _y"]


@pytest.mark.parametrize("path", CALLBACK_SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_callback_reads_a_private_attribute_of_the_module(path):
    assert private_module_attributes(path) == []


def test_training_and_evaluation_expose_their_token_losses(tiny_model_dir):
    """`last_train_tokens` after a training step and `last_eval_tokens` after an evaluation step hold the
    step's own per-token losses and mask (the numbers the loss was built from)."""
    from talr.methods import SFT
    from talr.tasks.evaluator import DomainEvaluator

    module = SFT(pretrained=str(tiny_model_dir), generate_in_eval=False)
    module.configure_model()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels, "index": torch.tensor([0, 1])}
    expected, mask = module.token_losses(batch)
    loss_sum = module.training_step(batch, 0)
    stats = module.last_train_tokens
    assert isinstance(stats, TokenLosses) and not stats.losses.requires_grad
    assert stats.mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    torch.testing.assert_close(stats.losses, expected.detach())
    torch.testing.assert_close(loss_sum.detach(), expected.detach().where(mask, 0.0).sum())

    class Task:
        def metrics(self):
            return torch.nn.ModuleDict()

    module.evaluator = DomainEvaluator(Task(), generate=False)
    module._trainer = type("T", (), {"world_size": 1})()  # a bare trainer: one process owns every row
    module.evaluator.step(module, batch, "val")
    assert module.last_eval_tokens is module.evaluator.last_tokens
    torch.testing.assert_close(module.last_eval_tokens.losses, expected.detach())
    assert module.last_eval_tokens.mask.tolist() == stats.mask.tolist()

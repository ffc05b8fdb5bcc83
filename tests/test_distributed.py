"""talr.distributed's small helpers (what is sharded, how to gather it), in one process: a plain model and a one-rank
FSDP2 group. The multi-rank behaviour is tested in test_fsdp2*.py and test_general_sharded.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_model

from talr.distributed import (
    base_model,
    is_distributed,
    is_dtensor,
    is_sharded,
    local_tensor,
    replicated_copy,
    shard_model,
    unsharded_copy,
)


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo process group and its CPU mesh; destroyed afterwards."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_plain_tensors_and_models_are_not_sharded(tokenizer):
    t = torch.ones(3)
    assert not is_dtensor(t) and local_tensor(t) is t
    model = make_tiny_model(tokenizer)
    assert not is_sharded(model) and not is_distributed()
    assert replicated_copy(model) is model  # whole on every rank already: no copy
    assert unsharded_copy(model) is model


def test_base_model_looks_through_peft(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tokenizer)
    assert base_model(model) is model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert base_model(wrapped) is model


def test_dtensor_and_its_local_shard(one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.arange(6.0).view(3, 2)
    d = distribute_tensor(full, one_rank, [Shard(0)])
    assert is_dtensor(d) and not is_dtensor(local_tensor(d))
    assert torch.equal(local_tensor(d), full)
    assert not is_distributed()  # one rank: nothing to gather


@pytest.mark.parametrize("lora", [False, True])
def test_copies_of_a_sharded_model_are_plain_and_equal(one_rank, tokenizer, lora):
    """Both copies come from one builder: the non-FSDP class, the same weights, adapters re-attached."""
    model = make_tiny_model(tokenizer)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():  # non-zero adapters, so a lost adapter shows
            if "lora_B" in name:
                torch.nn.init.normal_(p)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    shard_model(model, one_rank)
    assert is_sharded(model) and all(is_dtensor(p) for p in model.parameters())
    for copy in (replicated_copy(model), unsharded_copy(model)):
        assert not is_sharded(copy) and not any(is_dtensor(p) for p in copy.parameters())
        assert not type(base_model(copy)).__name__.startswith("FSDP")
        assert hasattr(copy, "peft_config") == lora
        got = copy.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not replicated_copy(model).training  # built for generation

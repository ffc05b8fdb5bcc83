"""The chunked per-token cross-entropy equals the plain path (losses and gradients under arbitrary per-token
upstream weights) and never keeps a (tokens, vocab) tensor for backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from talr.ops import causal_lm_token_losses, chunked_token_losses

B, T, H, V = 3, 23, 16, 211  # B*T = 69 tokens: no chunk size below divides the supervised count


def inputs(dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100  # a prompt
    labels[1, 15:] = -100  # padding
    labels[2, 3] = -100  # a hole
    upstream = torch.rand(B, T, generator=g) * 3.0  # TALR-like per-token weights, non-uniform
    return hidden, weight, b, labels, upstream


def naive(hidden, weight, labels, bias=None, softcap=None):
    logits = F.linear(hidden, weight, bias)  # same casts as the model's head: matmul in the inputs' dtype
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")


def grads(fn, hidden, weight, bias, upstream):
    losses = fn()
    params = [hidden, weight] + ([bias] if bias is not None else [])
    return losses, torch.autograd.grad((losses * upstream).sum(), params)


@pytest.mark.parametrize("impl", ["function", "checkpoint"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 4096])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (False, 3.0)])
def test_fp32_losses_and_grads_match_naive(impl, chunk, bias, softcap):
    hidden, weight, b, labels, up = inputs(bias=bias)
    ref, ref_g = grads(lambda: naive(hidden, weight, labels, b, softcap), hidden, weight, b, up)
    out, out_g = grads(lambda: chunked_token_losses(hidden, weight, labels, chunk, bias=b, softcap=softcap, impl=impl),
                       hidden, weight, b, up)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert torch.all(out[labels == -100] == 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, r in zip(["hidden", "weight", "bias"], out_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    assert torch.all(out_g[0][labels == -100] == 0)  # ignored positions get no gradient


def test_bf16_matches_naive_with_same_casts():
    """bf16 inputs: matmuls in bf16, softmax/loss in fp32 on both paths. The weight gradient is summed over
    chunks in fp32 (one bf16 rounding per chunk), so the tolerance is bf16's: rtol = atol = 2e-2."""
    hidden, weight, _, labels, up = inputs(torch.bfloat16)
    ref, ref_g = grads(lambda: naive(hidden, weight, labels), hidden, weight, None, up)
    out, out_g = grads(lambda: chunked_token_losses(hidden, weight, labels, 8), hidden, weight, None, up)
    assert out.dtype == torch.float32
    assert out_g[0].dtype == out_g[1].dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # same bf16 logits, fp32 softmax
    for a, r in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_autocast_uses_the_autocast_dtype():
    """Under autocast (bf16-mixed) fp32 inputs are multiplied in bf16, like the model's own head."""
    hidden, weight, _, labels, up = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_g = grads(lambda: naive(hidden, weight, labels), hidden, weight, None, up)
        out, out_g = grads(lambda: chunked_token_losses(hidden, weight, labels, 8), hidden, weight, None, up)
    assert out_g[0].dtype == out_g[1].dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for a, r in zip(out_g, ref_g):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("impl", ["function", "checkpoint"])
def test_no_full_logits_saved_for_backward(impl):
    hidden, weight, _, labels, _ = inputs()
    n_valid = int((labels != -100).sum())
    full = n_valid * V

    naive_shapes = saved_shapes(lambda: naive(hidden, weight, labels))
    assert max(torch.Size(s).numel() for s in naive_shapes) >= full  # the check can see full logits

    chunk = 8
    shapes = saved_shapes(lambda: chunked_token_losses(hidden, weight, labels, chunk, impl=impl))
    biggest = max(torch.Size(s).numel() for s in shapes)
    assert biggest == V * H  # the weight itself; nothing with a vocab-sized row per token
    assert not [s for s in shapes if V in s and s != (V, H)], shapes


PEAK_SCRIPT = """
import sys, torch, torch.nn.functional as F
from talr.ops import chunked_token_losses
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(1024, 64, generator=g, requires_grad=True)
weight = torch.randn(32768, 64, generator=g, requires_grad=True)
labels = torch.randint(0, 32768, (1024,), generator=g)
def run(n):
    if sys.argv[1] == "naive":
        losses = F.cross_entropy(hidden[:n] @ weight.T, labels[:n], reduction="none")
    else:
        losses = chunked_token_losses(hidden[:n], weight, labels[:n], 128)
    (losses * 1.5).sum().backward()
run(4)  # warm up on 4 tokens: the weight gradient and the kernels' buffers exist before the measurement
def status(key):  # KiB; VmHWM is this process's peak (ru_maxrss would carry the parent's over fork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
hidden.grad = None
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
except OSError:
    pass
before = status("VmRSS")
run(1024)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux /proc")
def test_peak_memory_lower_than_naive(tmp_path):
    """Peak resident memory (VmHWM) of forward + backward, each path in a fresh process (the torch profiler
    does not see CPU allocations reliably): (1024 tokens, 32768 vocab) fp32 logits are 128 MiB; chunked < naive / 3."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)

    def grow_kib(mode):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    naive_kib, chunk_kib = grow_kib("naive"), grow_kib("chunked")
    assert naive_kib > 2 * 128 * 1024, naive_kib  # logits and their log-softmax at least
    assert chunk_kib < naive_kib / 3, (chunk_kib, naive_kib)


def test_no_supervised_token():
    hidden, weight, _, labels, _ = inputs()
    labels = torch.full_like(labels, -100)
    out = chunked_token_losses(hidden, weight, labels, 8)
    assert torch.equal(out, torch.zeros_like(out))
    gh, gw = torch.autograd.grad(out.sum(), [hidden, weight])
    assert not gh.any() and not gw.any()


def test_errors():
    hidden, weight, _, labels, _ = inputs()
    with pytest.raises(ValueError):
        chunked_token_losses(hidden, weight, labels, 0)
    with pytest.raises(ValueError):
        chunked_token_losses(hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError):
        chunked_token_losses(hidden, weight, labels, impl="fused")


def test_causal_lm_token_losses_match_sft_path(tokenizer):
    """On a tiny Llama (tied embeddings) and its LoRA wrapper: same losses and parameter gradients as the
    plain `SFT.token_losses` path (full logits, shift, cross-entropy)."""
    from peft import LoraConfig, get_peft_model

    from conftest import make_tiny_model

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(tokenizer), (3, 19), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 12:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 12:] = -100
    up = torch.rand(3, 18, generator=g)

    def plain(model):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        y = labels[:, 1:]
        return F.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none"), y != -100

    for wrap in (False, True):
        model = make_tiny_model(tokenizer, seed=3).train()
        if wrap:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        results = []
        for fn in (plain, lambda m: causal_lm_token_losses(m, ids, attn, labels, chunk_size=7)):
            losses, mask = fn(model)
            results.append((losses.where(mask, 0.0), mask, torch.autograd.grad((losses.where(mask, 0.0) * up).sum(), params)))
        (ref, ref_mask, ref_g), (out, mask, out_g) = results
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(out_g, ref_g):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)

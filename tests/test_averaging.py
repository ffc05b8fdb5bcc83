"""WiSE-FT averaging: endpoints bitwise, midpoint = elementwise mean, CLI, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from talr.averaging import alpha_dirname, average_models, interpolate_state_dicts, main


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("wise")
    init, ft = root / "init", root / "ft"
    make_tiny_model(tokenizer, seed=0).save_pretrained(init)  # no tokenizer: it must come from ft
    make_tiny_model(tokenizer, seed=1).save_pretrained(ft)
    tokenizer.save_pretrained(ft)
    return init, ft


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {path}"
    return out


def test_endpoints_bitwise_and_midpoint_mean(two_models, tmp_path):
    init, ft = two_models
    paths = average_models(str(init), str(ft), [0.0, 1.0, 0.5], str(tmp_path / "avg"))
    assert [p.name for p in paths] == ["alpha_0.00", "alpha_1.00", "alpha_0.50"]
    sd0, sd1 = tensors(init), tensors(ft)
    assert set(sd0) == set(sd1)
    assert not torch.equal(sd0["model.embed_tokens.weight"], sd1["model.embed_tokens.weight"])
    for path, alpha in zip(paths, [0.0, 1.0, 0.5]):
        out = tensors(path)
        assert set(out) == set(sd0)
        for key, value in out.items():
            if alpha == 0.0:
                assert torch.equal(value, sd0[key]), key
            elif alpha == 1.0:
                assert torch.equal(value, sd1[key]), key
            else:
                torch.testing.assert_close(value, (sd0[key] + sd1[key]) / 2, rtol=0, atol=1e-7)
        meta = json.loads((path / "averaging.json").read_text())
        assert meta["alpha"] == alpha and meta["init"] == str(init) and meta["finetuned"] == str(ft)
        assert (path / "tokenizer_config.json").exists()
    # the written directory loads as a model whose (tied) weights are the average
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths[2], dtype=torch.float32)
    emb = (sd0["model.embed_tokens.weight"] + sd1["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), emb, rtol=0, atol=1e-7)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_interpolate_state_dicts_dtypes_and_aliases():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "step": torch.tensor([3]), "x": torch.tensor([0.1, 0.3])}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.bfloat16), "step": torch.tensor([3]), "x": torch.tensor([0.7, 0.9])}
    out = interpolate_state_dicts(a, b, 0.25)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.tensor([1.5, 2.75], dtype=torch.bfloat16))
    assert torch.equal(out["step"], a["step"]) and out["step"] is not a["step"]
    torch.testing.assert_close(out["x"], torch.tensor([0.25, 0.45]))
    for alpha, src in ((0.0, a), (1.0, b)):
        out = interpolate_state_dicts(a, b, alpha)
        assert all(torch.equal(out[k], src[k]) and out[k] is not src[k] for k in a)
    # tied tensors stay tied
    shared0, shared1 = torch.ones(2, 2), torch.zeros(2, 2)
    out = interpolate_state_dicts({"e": shared0, "h": shared0}, {"e": shared1, "h": shared1}, 0.5)
    assert out["e"] is out["h"] and torch.equal(out["e"], torch.full((2, 2), 0.5))


def test_errors_name_the_problem(tmp_path, tokenizer, two_models):
    a = {"w": torch.zeros(2, 3), "n": torch.tensor([1])}
    with pytest.raises(ValueError, match="'w'.*\\(2, 3\\) vs \\(3, 2\\)"):
        interpolate_state_dicts(a, {"w": torch.zeros(3, 2), "n": torch.tensor([1])}, 0.5)
    with pytest.raises(ValueError, match="only in the second \\['v'\\]"):
        interpolate_state_dicts(a, {**a, "v": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="'n' differs"):
        interpolate_state_dicts(a, {**a, "n": torch.tensor([2])}, 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
            interpolate_state_dicts(a, a, bad)
    init, ft = two_models
    with pytest.raises(ValueError, match="alpha"):
        average_models(str(init), str(ft), [0.5, 2.0], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()  # validated before any loading/writing
    wide = tmp_path / "wide"
    make_tiny_model(tokenizer, seed=2, intermediate_size=48).save_pretrained(wide)
    with pytest.raises(ValueError, match="mlp.*shape mismatch|shape mismatch.*mlp"):
        average_models(str(init), str(wide), [0.5], str(tmp_path / "out"))


def test_cli(two_models, tmp_path, capsys):
    init, ft = two_models
    out = tmp_path / "cli"
    assert main(["--init", str(init), "--finetuned", str(ft), "--alpha", "0.25", "--alphas", "0.5,0.125",
                 "--output-dir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["alpha_0.125", "alpha_0.25", "alpha_0.50"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in ("alpha_0.25", "alpha_0.50", "alpha_0.125")]
    sd0, sd1 = tensors(init), tensors(ft)
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(tensors(out / "alpha_0.25")[key], 0.75 * sd0[key] + 0.25 * sd1[key], rtol=0, atol=1e-7)
    with pytest.raises(SystemExit):
        main(["--init", str(init), "--finetuned", str(ft), "--alpha", "1.5", "--output-dir", str(out)])
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--init", str(init), "--finetuned", str(ft), "--alphas", "0.5,x", "--output-dir", str(out)])


def test_alpha_dirname():
    assert [alpha_dirname(a) for a in (0.0, 0.5, 1.0, 0.25, 0.125)] == [
        "alpha_0.00", "alpha_0.50", "alpha_1.00", "alpha_0.25", "alpha_0.125"]

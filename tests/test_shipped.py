"""The weights shipped in pretrained/ (checkpoint.slim_checkpoint, sample.py --export): drawing
only, half the bits, loaded safely, and what sample.py falls back to before any training."""
import pytest
import torch
from torch.testing import assert_close

import sample
import train
from checkpoint import RESUME, SHIPPED, build_guide, build_model, load_checkpoint
from samplers import generate


def test_an_exported_copy_draws_as_the_original_does_and_cannot_be_resumed(good_checkpoint, tmp_path, fails):
    sample.main(["--checkpoint", str(good_checkpoint), "--export", str(tmp_path / "slim.pt")])
    full, slim = load_checkpoint(good_checkpoint), load_checkpoint(tmp_path / "slim.pt")
    assert not any(k in slim for k in RESUME) and slim["model"] == {}
    assert all(v.dtype == torch.float16 for v in slim["ema"].values() if v.is_floating_point())
    assert (tmp_path / "slim.pt").stat().st_size < 0.3 * good_checkpoint.stat().st_size
    a, b = (generate(build_model(c)[0], build_model(c)[1], 4, seed=1, progress=False) for c in (full, slim))
    assert_close(b, a, atol=1e-2, rtol=0)  # fp16 weights: the same images, to a hundredth
    assert "cannot be resumed: it lacks optimizer" in fails(train, ["--resume", tmp_path / "slim.pt"])
    assert "not the raw ones that --no-ema" in fails(sample, ["--checkpoint", tmp_path / "slim.pt", "--no-ema"])
    before = (tmp_path / "slim.pt").read_bytes()
    assert "--export" in fails(sample, ["--checkpoint", good_checkpoint, "--export", tmp_path / "slim.pt"])
    assert (tmp_path / "slim.pt").read_bytes() == before


def test_the_shipped_checkpoint_loads_with_weights_only_and_samples():
    assert SHIPPED.is_file(), "pretrained/ ships the default recipe's weights"
    ckpt = load_checkpoint(SHIPPED)  # torch.load with weights_only, checked like any checkpoint
    assert ckpt["distillation"] is None and ckpt["guide"] is not None and not any(k in ckpt for k in RESUME)
    assert SHIPPED.stat().st_size < 6 * 2**20
    model, diffusion = build_model(ckpt)
    assert build_guide(ckpt) is not None and model.config.num_classes == 10
    x = generate(model, diffusion, 2, seed=0, progress=False, labels=torch.tensor([0, 9]), guidance=1.0)
    assert x.shape == (2, 1, 28, 28) and x.isfinite().all() and x.std() > 0.1


def test_sample_draws_with_the_shipped_weights_until_a_run_is_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: as on a fresh clone before `python train.py`
    sample.main(["--n", "2", "--steps", "2", "--output-dir", "out"])
    out = capsys.readouterr().out
    assert "drawing with the weights shipped in pretrained/fashion-mnist.pt" in out
    assert "python train.py" in out and (tmp_path / "out" / "samples.png").is_file()


def test_a_trained_run_is_drawn_from_and_never_the_shipped_weights(tmp_path, monkeypatch, good_checkpoint,
                                                                     capsys, fails):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt.pt").write_bytes(good_checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    sample.main(["--n", "2", "--steps", "2", "--output-dir", "out"])
    assert "shipped" not in capsys.readouterr().out
    (tmp_path / "empty").mkdir()  # a folder named on the command line and holding nothing: refused
    assert "no checkpoint in empty/" in fails(sample, ["--checkpoint", "empty", "--n", "2"])

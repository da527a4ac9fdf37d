"""The scripts as a user runs them: real processes, real files."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--width", "8", "--channel-mults", "1", "2", "--attn-resolutions", "14", "--timesteps", "20",
              "--batch-size", "16"]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.fixture
def dirs(tmp_path, fake_mnist, monkeypatch):
    folder, _ = fake_mnist
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    return {name: tmp_path / name for name in ("data", "ckpt", "out")}


@pytest.mark.slow
def test_train_then_sample_write_the_pictures(dirs):
    r = run("train.py", *TINY_FLAGS, "--max-steps", "6", "--log-every", "2", "--sample-n", "4",
            "--data-dir", dirs["data"], "--checkpoint-dir", dirs["ckpt"], "--output-dir", dirs["out"])
    assert r.returncode == 0, r.stderr
    assert "preset cpu" in r.stdout and "parameters" in r.stdout
    for name in ("forward_diffusion.png", "loss.png", "loss.csv", "samples.png"):
        assert (dirs["out"] / name).stat().st_size > 0, name
    assert (dirs["ckpt"] / "ckpt.pt").is_file()
    assert (dirs["out"] / "loss.csv").read_text().splitlines()[0] == "step,epoch,loss"
    assert len((dirs["out"] / "loss.csv").read_text().splitlines()) == 1 + 6  # a row per step

    (dirs["out"] / "samples.png").unlink()
    npz = dirs["out"] / "gen.npz"
    r = run("sample.py", "--checkpoint", dirs["ckpt"], "--n", "5", "--trajectory", "--save-npz", npz,
            "--output-dir", dirs["out"])
    assert r.returncode == 0, r.stderr
    assert (dirs["out"] / "samples.png").stat().st_size > 0
    assert (dirs["out"] / "denoising.png").stat().st_size > 0
    images = np.load(npz)["images"]
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(dirs):
    common = [*TINY_FLAGS, "--sample-n", "0", "--data-dir", dirs["data"], "--checkpoint-dir", dirs["ckpt"],
              "--output-dir", dirs["out"]]
    assert run("train.py", *common, "--max-steps", "3").returncode == 0
    r = run("train.py", *common, "--max-steps", "5", "--resume", dirs["ckpt"] / "ckpt.pt")
    assert r.returncode == 0, r.stderr
    assert "trained to step 5" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be a positive"),
    (["--checkpoint", "no/such/file.pt"], "does not exist"),
])
def test_sample_bad_input_is_one_line_and_exit_2(args, message):
    r = run("sample.py", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_empty_folder_lists_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    r = run("sample.py", "--checkpoint", tmp_path)
    assert r.returncode == 2 and "notes.txt" in r.stderr

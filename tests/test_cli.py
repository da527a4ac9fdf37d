"""The scripts as a user runs them: real processes, real files."""
import numpy as np
import pytest


@pytest.mark.slow
def test_train_then_sample_write_the_pictures(cli):
    r = cli.run("train.py", "--max-steps", "6", "--log-every", "2", "--sample-n", "4")
    assert r.returncode == 0, r.stderr
    assert "preset cpu" in r.stdout and "parameters" in r.stdout
    for name in ("forward_diffusion.png", "loss.png", "loss.csv", "samples.png"):
        assert (cli.out / name).stat().st_size > 0, name
    assert (cli.ckpt / "ckpt.pt").is_file()
    rows = (cli.out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss" and len(rows) == 1 + 6  # a row per step

    (cli.out / "samples.png").unlink()
    npz = cli.out / "gen.npz"
    r = cli.run("sample.py", "--n", "5", "--trajectory", "--save-npz", npz)
    assert r.returncode == 0, r.stderr
    assert (cli.out / "samples.png").stat().st_size > 0
    assert (cli.out / "denoising.png").stat().st_size > 0
    images = np.load(npz)["images"]
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(cli):
    assert cli.run("train.py", "--max-steps", "3", "--sample-n", "0").returncode == 0
    r = cli.run("train.py", "--max-steps", "5", "--sample-n", "0", "--resume", cli.ckpt / "ckpt.pt")
    assert r.returncode == 0, r.stderr
    assert "training from step 3 to 5" in r.stdout and "trained to step 5" in r.stdout

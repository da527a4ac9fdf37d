"""The scripts as a user runs them: real processes, real files."""
import subprocess
import sys

import numpy as np
import pytest

import train
from checkpoint import load_checkpoint
from conftest import TINY_FLAGS


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


@pytest.mark.slow
def test_a_fresh_run_never_replaces_an_earlier_one(cli):
    assert cli.run("train.py", "--max-steps", "4", "--checkpoint-every", "2", "--sample-n", "0").returncode == 0
    before = {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")}
    assert sorted(before) == ["ckpt.prev.pt", "ckpt.pt"]
    again = cli.run("train.py", "--max-steps", "2", "--sample-n", "0")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "already holds a run" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")} == before
    # A copy kept beside the run is not the run: resuming from it there would rotate the run away.
    (cli.ckpt / "kept.pt").write_bytes(before["ckpt.prev.pt"])
    fork = cli.run("train.py", "--max-steps", "6", "--sample-n", "0", "--resume", cli.ckpt / "kept.pt")
    assert fork.returncode == 2 and "already holds a run" in fork.stderr, fork.stderr
    assert {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")} == before
    replaced = cli.run("train.py", "--max-steps", "2", "--sample-n", "0", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert load_checkpoint(cli.ckpt)["step"] == 2
    assert not (cli.ckpt / "ckpt.prev.pt").exists()  # the old run is gone, not lying in wait for a --resume


@pytest.mark.slow
def test_limits_belong_to_the_command_not_the_run(cli):
    # 256 fake images in batches of 16: one epoch is 16 steps.
    assert cli.run("train.py", "--epochs", "1", "--max-steps", "3", "--sample-n", "0").returncode == 0
    r = cli.run("train.py", "--resume", cli.ckpt, "--sample-n", "0")
    assert r.returncode == 0, r.stderr
    assert "training from step 3 to 16" in r.stdout and "trained to step 16" in r.stdout
    before = {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")}
    for flags, limit in (([], "--epochs"), (["--epochs", "2", "--max-steps", "10"], "--max-steps")):
        done = cli.run("train.py", "--resume", cli.ckpt, "--sample-n", "0", *flags)
        assert done.returncode == 2 and "is at step 16, where this command would stop" in done.stderr
        assert f"give a larger {limit}" in done.stderr
        assert {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")} == before  # nothing rotated away
    # Without --checkpoint-dir a resumed run goes on in the folder it came from, not in ./checkpoints.
    command = [sys.executable, cli.root / "train.py", "--data-dir", cli.data, *TINY_FLAGS, "--output-dir", cli.out,
               "--resume", cli.ckpt, "--sample-n", "0", "--epochs", "2", "--max-steps", "20"]
    more = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=cli.out.parent, timeout=600)
    assert more.returncode == 0 and "training from step 16 to 20" in more.stdout, more.stderr
    assert load_checkpoint(cli.ckpt)["step"] == 20 and not (cli.out.parent / "checkpoints").exists()


@pytest.mark.slow
def test_resume_falls_back_from_a_damaged_newest_checkpoint(cli):
    assert cli.run("train.py", "--max-steps", "4", "--checkpoint-every", "2", "--sample-n", "0").returncode == 0
    newest = cli.ckpt / "ckpt.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a failing disk
    damaged = newest.read_bytes()
    r = cli.run("train.py", "--resume", cli.ckpt, "--max-steps", "6", "--sample-n", "0")
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and "using the previous checkpoint" in r.stderr and "(step 2)" in r.stderr
    assert "training from step 2 to 6" in r.stdout
    assert (cli.ckpt / "ckpt.damaged.pt").read_bytes() == damaged  # kept for a look, out of the rotation
    assert load_checkpoint(newest, fallback=False)["step"] == 6
    assert load_checkpoint(cli.ckpt / "ckpt.prev.pt")["step"] == 4


def test_the_suite_hides_cuda_from_itself_and_every_process_it_starts(cli):
    """On a GPU machine --preset auto would otherwise pick gpu inside the tests (a 40-epoch preset)."""
    import os
    import subprocess
    import sys

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and cli.env["CUDA_VISIBLE_DEVICES"] == ""
    seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=cli.env,
                          capture_output=True, text=True).stdout
    assert seen.strip() == "0"


def test_bench_flags_are_checked_like_every_other_command(fails, tmp_path):
    import bench

    assert "--steps: must be a whole number from 1 to" in fails(bench, ["--steps", "0", "--json", tmp_path / "b.json"])
    assert "--sample-n: must be a whole number from 1 to" in fails(bench, ["--sample-n", "-2", "--json", tmp_path / "b.json"])
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_bench_measures_the_cpu_preset_as_it_trains(cli, tmp_path):
    """One timed step per setting, on fake data: bench.py builds the preset's configs as train.py does ("auto" too)."""
    import json

    flags = ["--data-dir", cli.data, "--steps", "1", "--warmup", "1", "--skip", "compile", "ddpm1000", "--sample-n",
             "2", "--json", tmp_path / "b.json"]
    r = subprocess.run([sys.executable, cli.root / "bench.py", *flags], capture_output=True, text=True, cwd=tmp_path,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "b.json").read_text())
    training = [row for row in results["rows"] if not row["setting"].startswith("sample")]
    assert results["preset"] == "cpu" and len(training) == 5  # plain, then fp32 and bf16, each with channels_last
    assert all(row["images_per_s"] > 0 for row in results["rows"])


@pytest.mark.parametrize("script", ["train", "sample", "evaluate", "bench"])
def test_every_flag_has_help_and_the_help_renders(script):
    import importlib

    parser = importlib.import_module(script).build_parser()
    assert "usage:" in parser.format_help() and "(default: None)" not in parser.format_help()
    assert all(action.help for action in parser._actions)


def test_the_loss_curve_is_named_after_the_loss_trained(cli, monkeypatch):
    names = []
    monkeypatch.setattr(train, "save_loss_history", lambda history, out, name: names.append(name))
    for flags in ([], ["--min-snr-gamma", "5"], ["--prediction", "v"]):
        train.main([str(a) for a in cli.command("train.py", "--max-steps", "1", "--sample-n", "0", "--overwrite",
                                                *flags)[2:]])
    assert names == ["L_simple, eps MSE", "eps MSE, min-SNR-5 weighted", "v MSE"]

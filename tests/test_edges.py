"""Numbers at their edges and resource bombs: every --seed takes what `date +%s%N` prints and refuses
in one line what torch's generators cannot hold; a schedule, a model or a checkpoint's config too
large for the machine is refused before its memory is allocated."""
import pytest
import torch

import distill
import evaluate
import sample
import train
from checkpoint import load_checkpoint

NANOSECONDS = "1764763200123456789"  # `date +%s%N` on 2025-12-03: 19 digits


@pytest.mark.parametrize("module", [train, sample, evaluate, distill])
@pytest.mark.parametrize("value", ["-1", "9223372036854775808", "100000000000000000000", "1e3", "nan"])
def test_a_seed_torch_cannot_hold_is_one_line(module, value, tmp_path, fails):
    err = fails(module, ["--seed", value, "--output-dir", tmp_path / "out"])
    assert "argument --seed: must be a whole number from 0 to 9223372036854775807" in err
    assert not (tmp_path / "out").exists()  # refused while parsing, before any folder is made


def test_a_nanosecond_seed_trains_resumes_and_samples(cli):
    r = cli.run("train.py", "--steps", "2", "--max-steps", "1", "--sample-n", "0", "--seed", NANOSECONDS)
    assert r.returncode == 0, r.stderr
    r = cli.run("train.py", "--resume", cli.ckpt, "--sample-n", "0")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["step"] == 2 and ckpt["config"]["train"]["seed"] == int(NANOSECONDS)
    r = cli.run("sample.py", "--n", "2", "--steps", "2", "--seed", NANOSECONDS)
    assert r.returncode == 0 and (cli.out / "samples.png").is_file(), r.stderr


def test_a_typo_of_a_schedule_is_refused_before_it_is_made(tmp_path, fails):
    err = fails(train, ["--timesteps", "4000000000", "--data-dir", tmp_path / "d", "--checkpoint-dir",
                        tmp_path / "c", "--output-dir", tmp_path / "o"])
    assert "timesteps must be from 2 to 100000, got 4000000000" in err and not (tmp_path / "c").exists()


def test_a_model_larger_than_the_machine_is_refused_before_it_is_built(cli):
    r = cli.run("train.py", "--width", "1048576", "--steps", "1")
    assert r.returncode == 2 and "GiB for its weights, EMA, gradients and Adam alone" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (cli.ckpt / "ckpt.pt").exists()


def test_a_checkpoint_config_that_claims_more_than_its_weights_is_refused(good_checkpoint, tmp_path, fails):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    config = {**ckpt["config"], "model": {**ckpt["config"]["model"], "width": 1 << 16}}
    torch.save({**ckpt, "config": config}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "out"])
    assert "the config asks for" in err and "the file holds" in err


@pytest.mark.parametrize("device", ["meta", "xpu", "cuda:7", "cpu:x"])
def test_a_device_this_machine_lacks_is_one_line(device, tmp_path, fails, good_checkpoint):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--device", device, "--output-dir", tmp_path / "o"])
    assert f"--device {device}" in err or f"--device '{device}'" in err
    assert not (tmp_path / "o" / "samples.png").exists()


@pytest.mark.parametrize("field, value", [("step", "12"), ("epoch", -1), ("step", 3.5), ("step", True)])
def test_a_step_or_epoch_that_is_not_a_count_is_damaged_and_gives_way_to_the_previous_file(
        good_checkpoint, tmp_path, fails, field, value):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    torch.save({**ckpt, field: value}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path, "--output-dir", tmp_path / "out"])
    assert "is damaged: its step and epoch" in err
    (tmp_path / "ckpt.prev.pt").write_bytes(good_checkpoint.read_bytes())
    assert load_checkpoint(tmp_path)["step"] == ckpt["step"]

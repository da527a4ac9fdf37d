"""Never lose a run, never trust a bad file: signals, kill -9, divergence and bad input."""
import os
import random
import signal
import time

import pytest
import torch

import sample
import train
from checkpoint import build_model, load_checkpoint
from cli import Diverged
from config import TrainConfig
from conftest import leftovers, wait_for

GARBAGE = random.Random(0).randbytes(4096)  # fixed, so every run tries the same bytes


# ---------------------------------------------------------------------------- interruptions
# Each test acts on what the process printed (a progress line is printed as its step ends), never on a
# guess of how long something takes; --log-every 1 makes a line per step.

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_with_a_checkpoint_and_status_0(cli, sig):
    p = cli.start("train.py", "--epochs", "1000", "--checkpoint-every", "100000", "--log-every", "1")
    wait_for(p, "step 3/")
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert f"{sig.name} received" in out and "python train.py --resume" in out
    ckpt = load_checkpoint(cli.ckpt)
    assert 3 <= ckpt["step"] < 1000 * 16
    build_model(ckpt)
    assert not (cli.out / "samples.png").exists()  # stopping by hand skips the final sampling


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(cli):
    # A wide model and a big batch make the first step take seconds: the second signal lands inside it.
    p = cli.start("train.py", "--width", "64", "--batch-size", "256", "--epochs", "100")
    wait_for(p, "training from step")
    p.send_signal(signal.SIGINT)
    wait_for(p, "SIGINT received")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 130, (out, err)
    assert "aborted" in err and "Traceback" not in err
    assert not (cli.ckpt / "ckpt.pt").exists() and not leftovers(cli.ckpt)  # nothing half-written either


@pytest.mark.slow
def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(cli, tmp_path):
    n, flags = 60, ["--epochs", "1000", "--sample-n", "0", "--checkpoint-every", "100000", "--log-every", "10"]
    straight = cli.run("train.py", "--max-steps", n, *flags, "--checkpoint-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    p = cli.start("train.py", "--max-steps", n, *flags)
    wait_for(p, "step 20/")
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=600)
    k = load_checkpoint(cli.ckpt)["step"]
    assert 20 <= k < n, "the signal must land mid-run for this test to mean anything"
    resumed = cli.run("train.py", "--max-steps", n, *flags, "--resume", cli.ckpt)
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(cli.ckpt)
    assert a["step"] == b["step"] == n and a["history"] == b["history"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_complete_checkpoint(cli):
    flags = ["--epochs", "1000", "--checkpoint-every", "1", "--log-every", "1", "--sample-n", "0"]
    assert cli.run("train.py", *flags, "--max-steps", "2").returncode == 0
    last, mid_write = 2, 0
    # One kill during start-up, the rest after 1 to 8 finished steps. Every step writes a checkpoint
    # right after its progress line; the short pauses after the line only spread the kills over that
    # save (no assertion depends on where they land).
    for steps, pause in ((0, 0), (1, 0), (2, 0.003), (4, 0.006), (6, 0.01), (8, 0.015)):
        p = cli.start("train.py", *flags, "--max-steps", "0", "--resume", cli.ckpt)
        wait_for(p, "training from step")
        for _ in range(steps):
            wait_for(p, "step ", at_start=True)
        time.sleep(pause)
        p.kill()
        p.communicate()
        mid_write += bool(leftovers(cli.ckpt)) or not (cli.ckpt / "ckpt.pt").exists()
        ckpt = load_checkpoint(cli.ckpt)
        build_model(ckpt)
        assert ckpt["step"] >= last + max(0, steps - 1)  # the line of step s + 1 means s is saved
        last = ckpt["step"]
    print(f"6 kills -9, each left a loadable checkpoint; {mid_write} landed mid-save; last step {last}")
    # The next run takes the lock the killed one held, and sweeps up temporary files of killed saves.
    (cli.ckpt / ".ckpt.pt.killed.tmp").write_bytes(b"half a checkpoint")
    assert cli.run("train.py", *flags, "--max-steps", last + 1, "--resume", cli.ckpt).returncode == 0
    assert not leftovers(cli.ckpt)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, tiny_run):
    calls = []

    def poison_from_step_6(loss):
        def hooked(*args):
            calls.append(1)
            value = loss(*args)
            return value * float("nan") if len(calls) >= 6 else value
        return hooked

    cfg = TrainConfig(epochs=1, batch_size=2, checkpoint_every=2, log_every=1)
    with pytest.raises(Diverged, match="nan at step 6"):
        tiny_run(tmp_path, tiny_config, cfg, loss_hook=poison_from_step_6)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in [*ckpt["model"].values(), *ckpt["ema"].values()])


@pytest.mark.slow
def test_divergence_is_one_line_status_1_and_the_checkpoint_is_untouched(cli):
    assert cli.run("train.py", "--max-steps", "3", "--sample-n", "0").returncode == 0
    before = (cli.ckpt / "ckpt.pt").read_bytes()
    r = cli.run("train.py", "--max-steps", "50", "--resume", cli.ckpt, "--lr", "1e30", "--warmup-steps", "0",
                "--log-every", "1")
    assert r.returncode == 1
    assert "diverged" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (cli.ckpt / "ckpt.pt").read_bytes() == before


# ---------------------------------------------------------------------------- bad input

class Evil:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_files(folder, good):
    """(name, path, expected message) for every kind of unusable checkpoint."""
    ckpt = torch.load(good, weights_only=True)
    raw = good.read_bytes()
    files = {"truncated": raw[: len(raw) // 2], "garbage": GARBAGE, "empty": b""}
    for name, content in files.items():
        (folder / f"{name}.pt").write_bytes(content)
    torch.save({"state_dict": ckpt["model"]}, folder / "foreign.pt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "ema"}, folder / "incomplete.pt")
    wider = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "width": 16}}}
    torch.save(wider, folder / "mismatch.pt")
    torch.save({**ckpt, "model": Evil(folder / "pwned")}, folder / "evil.pt")
    (folder / "empty_dir").mkdir()
    (folder / "empty_dir" / "notes.txt").write_text("not a checkpoint")
    return [("truncated", "damaged"), ("garbage", "damaged"), ("empty", "damaged"),
            ("foreign", "not a checkpoint of this project"), ("tensor", "not a checkpoint of this project"),
            ("incomplete", "lacks ema"), ("mismatch", "does not match its weights"),
            ("evil", "refusing"), ("missing", "does not exist"), ("empty_dir", "notes.txt")]


def test_the_evil_file_would_really_run_code(tmp_path, good_checkpoint):
    bad_files(tmp_path, good_checkpoint)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe way, here on purpose
    assert (tmp_path / "pwned").exists()


def test_sample_refuses_every_bad_checkpoint_and_overwrites_nothing(tmp_path, good_checkpoint, fails):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"earlier results")
    cases = bad_files(tmp_path, good_checkpoint)
    for name, message in cases:
        path = tmp_path / (name if name == "empty_dir" else f"{name}.pt")
        err = fails(sample, ["--checkpoint", path, "--output-dir", out, "--n", 2])
        assert message in err, (name, err)
    assert not (tmp_path / "pwned").exists(), "the pickle payload ran"
    assert (out / "samples.png").read_bytes() == b"earlier results"
    assert len(cases) == 10


@pytest.mark.parametrize("args, message", [
    (["--sampler", "euler"], "invalid choice"),
    (["--steps", "0"], "--steps must be between 1 and 20"),
    (["--steps", "21"], "--steps must be between 1 and 20"),
    (["--n", "0"], "argument --n: must be a whole number from 1 to 10000000, got '0'"),
    (["--n", "100000000000000000000"], "argument --n: must be a whole number from 1 to 10000000"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number from 1 to 65536"),
    (["--sampler", "ddim", "--eta", "-0.5"], "--eta must be between 0"),
    (["--sampler", "ddpm", "--eta", "1"], "--eta applies to ddim and dpm++"),
    (["--device", "tpu9"], "not a torch device"),
    (["--guidance", "2"], "--guidance applies to class-conditional models only"),
    (["--guidance", "-1"], "--guidance must be 0"),
    (["--class", "bag"], "--class needs a class-conditional model"),
])
def test_sample_bad_arguments(args, message, good_checkpoint, tmp_path, fails):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--output-dir", tmp_path, *args])
    assert message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be a whole number from 1 to 1000000000"),
    (["--batch-size", "-4"], "argument --batch-size: must be a whole number from 1 to 65536"),
    (["--lr", "0"], "--lr must be positive"),
    (["--batch-size", "300"], "larger than the 256 training images"),
    (["--timesteps", "1"], "timesteps must be from 2 to 100000, got 1"),
    (["--width", "12"], "multiple of 8"),
    (["--schedule", "quadratic"], "invalid choice"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (["--output-dir", "{file}/out"], "cannot write to"),
    (["--checkpoint-dir", "{file}/ckpt"], "cannot write to"),
    (["--resume", "{good}", "--width", "16"], "--width 16 (checkpoint: 8)"),
    (["--resume", "{good}", "--timesteps", "50"], "--timesteps 50 (checkpoint: 20)"),
    (["--resume", "{garbage}"], "damaged"),
    (["--width", "56"], "112 channels, which its 3 heads of 32 do not divide"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--dropout", "-0.1"], "dropout must be in [0, 1)"),
    (["--attn-resolutions", "5"], "feature maps are 28, 14 pixels wide"),
    (["--channel-mults", "1", "0"], "channel_mults must be one or more positive integers"),
    (["--num-res-blocks", "0"], "num_res_blocks must be from 1 to 100"),
    (["--num-res-blocks", "100000000000000000000"], "num_res_blocks must be from 1 to 100"),
    (["--cond-drop", "0.2"], "--cond-drop applies to class-conditional models only"),
    (["--conditional", "--cond-drop", "1.5"], "--cond-drop must be in [0, 1]"),
    (["--sample-n", "-1"], "argument --sample-n: must be a whole number from 0 to 10000000"),
    (["--min-snr-gamma", "nan"], "argument --min-snr-gamma: must be a finite number, got 'nan'"),
    (["--min-snr-gamma", "-1"], "min_snr_gamma must be 0 (off) or more, got -1"),
    (["--max-steps", "-1"], "argument --max-steps: must be a whole number from 0 to 1000000000"),
    (["--warmup-steps", "-5"], "argument --warmup-steps: must be a whole number from 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be a whole number from 1"),
    (["--precision", "fp16"], "invalid choice"),
    (["--resume", "{good}"], "--batch-size 16 (checkpoint: 8)"),
    (["--resume", "{good}", "--batch-size", "8", "--seed", "1"], "--seed 1 (checkpoint: 0)"),
    (["--resume", "{good}", "--batch-size", "8", "--preset", "gpu"], "--preset does not apply with --resume"),
    (["--resume", "{misfit}", "--batch-size", "8"], "does not fit its own config, so it cannot be resumed"),
    (["--resume", "{weights}", "--batch-size", "8"], "cannot be resumed: it lacks optimizer, history"),
    (["--resume", "{good}", "--batch-size", "8", "--conditional"], "--conditional (checkpoint: unconditional)"),
])
def test_train_bad_arguments(args, message, cli, good_checkpoint, tmp_path, fails):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "garbage.pt").write_bytes(GARBAGE[:100])
    ckpt = torch.load(good_checkpoint, weights_only=True)
    adam = ckpt["optimizer"]  # Adam's state for another model: loads as a checkpoint, cannot resume
    torch.save({**ckpt, "optimizer": {**adam, "param_groups": adam["param_groups"][:0]}}, tmp_path / "misfit.pt")
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "history")}, tmp_path / "weights.pt")
    args = [a.format(file=tmp_path / "a_file", good=good_checkpoint, garbage=tmp_path / "garbage.pt",
                     misfit=tmp_path / "misfit.pt", weights=tmp_path / "weights.pt") for a in args]
    cli.ckpt.mkdir()
    (cli.ckpt / "ckpt.pt").write_bytes(b"an earlier run")
    err = fails(train, cli.command("train.py", *args, "--overwrite")[2:])  # replacing it is allowed, not done
    assert message in err
    assert (cli.ckpt / "ckpt.pt").read_bytes() == b"an earlier run"
    assert not cli.out.exists() or not list(cli.out.iterdir())

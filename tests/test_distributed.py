"""train.py under torchrun: two CPU processes (gloo) against one process with the same global batch."""
import subprocess

import pytest
import torch

import train
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real torchrun launches, about 35 s

FLAGS = ["--max-steps", "6", "--log-every", "2", "--checkpoint-every", "4", "--sample-n", "0", "--lr", "3e-3",
         "--warmup-steps", "1"]


def torchrun(cli, out, *flags, processes=2, env=()):
    """Run tests/ddp_worker.py (train.py's run, then each rank's weights to out/rankR.pt) on `processes` CPUs."""
    out.mkdir(exist_ok=True)
    command = cli.command("train.py", *FLAGS, *flags)
    command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    str(cli.root / "tests" / "ddp_worker.py"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cli.root, timeout=600,
                          env={**cli.env, "PYTHONPATH": str(cli.root), "OMP_NUM_THREADS": "1", **dict(env)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]


def test_two_processes_take_the_single_process_steps(cli, tmp_path):
    stdout, (rank0, rank1) = torchrun(cli, tmp_path / "ddp", "--batch-size", "8", "--checkpoint-dir", tmp_path / "ddp")
    assert "effective batch 16 (8 per process x 2 processes)" in stdout
    assert stdout.count("trained to step 6") == 1  # only rank 0 talks
    for key in ("model", "ema"):
        for name, a in rank0[key].items():
            assert torch.equal(a, rank1[key][name]), f"{key} {name} differs between ranks"

    single = cli.run("train.py", *FLAGS, "--batch-size", "16", "--checkpoint-dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    one, two = load_checkpoint(tmp_path / "single"), load_checkpoint(tmp_path / "ddp")
    assert list(two["model"]) == list(one["model"])  # no "module." prefixes: sample.py reads either
    assert [s for s, *_ in two["history"]] == [s for s, *_ in one["history"]] == list(range(1, 7))
    # Same global batch, timesteps and noise: the losses agree up to float summation order (gradients
    # averaged by all-reduce, convolutions on 1 thread per rank instead of 2).
    torch.testing.assert_close([v for *_, v in two["history"]], [v for *_, v in one["history"]], rtol=1e-4, atol=0)

    drawn = cli.run("sample.py", "--checkpoint", tmp_path / "ddp", "--n", "4", "--steps", "5")
    assert drawn.returncode == 0, drawn.stderr
    assert (cli.out / "samples.png").is_file()


def test_each_rank_draws_its_own_dropout_masks(cli, tmp_path):
    """The same seed everywhere makes the ranks agree on the global batch's timesteps and noise; dropout
    masks must not agree, or every rank would drop the same units of its own images."""
    _, (rank0, rank1) = torchrun(cli, tmp_path / "d", "--dropout", "0.5", "--max-steps", "2", "--checkpoint-dir",
                                 tmp_path / "d", env={"RECORD_DROPOUT": "1"})
    (a,), (b,) = rank0["masks"], rank1["masks"]
    assert a.shape == b.shape and 0.4 < a.float().mean() < 0.6
    assert (a != b).float().mean() > 0.3  # independent masks differ in about half the units
    for name, w in rank0["model"].items():
        assert torch.equal(w, rank1["model"][name]), name  # the weights still agree


def test_resume_under_torchrun_matches_an_uninterrupted_run(cli, tmp_path):
    _, (straight, _) = torchrun(cli, tmp_path / "a", "--batch-size", "8", "--checkpoint-dir", tmp_path / "a")
    torchrun(cli, tmp_path / "b", "--batch-size", "8", "--checkpoint-dir", tmp_path / "b", "--max-steps", "3")
    _, (resumed, _) = torchrun(cli, tmp_path / "b", "--resume", tmp_path / "b" / "ckpt.pt", "--batch-size", "8",
                               "--checkpoint-dir", tmp_path / "b")
    for key in ("model", "ema"):
        for name, a in straight[key].items():
            assert torch.equal(a, resumed[key][name]), f"{key} {name}"

    alone = cli.run("train.py", "--resume", tmp_path / "b" / "ckpt.pt", "--checkpoint-dir", tmp_path / "b",
                    "--batch-size", "8")
    assert alone.returncode == 2 and "made by 2 process(es)" in alone.stderr, alone.stderr


def test_a_fixed_device_under_torchrun_is_refused(cli, monkeypatch, fails):
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    err = fails(train, ["--device", "cuda:1", "--data-dir", cli.data, "--checkpoint-dir", cli.ckpt])
    assert "LOCAL_RANK" in err and "cuda:1" in err
    assert not cli.ckpt.exists()


@pytest.mark.parametrize("size", ["2", "two", "0"])
def test_a_world_size_left_in_the_environment_without_torchrun_is_one_line(cli, monkeypatch, fails, size):
    """WORLD_SIZE alone (an exported shell variable, a job scheduler's) once waited for peers forever."""
    monkeypatch.setenv("WORLD_SIZE", size)
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    err = fails(train, ["--data-dir", cli.data, "--checkpoint-dir", cli.ckpt])
    assert f"WORLD_SIZE={size} is set, but not as torchrun sets it" in err and not cli.ckpt.exists()


def test_a_problem_found_by_one_process_stops_them_all(cli, tmp_path):
    """Only rank 0 locks and checks the checkpoint folder: when it refuses, the other rank must not wait
    for it forever at the next collective."""
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "ckpt.pt").write_bytes(b"an earlier run")
    command = cli.command("train.py", *FLAGS, "--checkpoint-dir", folder)
    command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # then train.py
    done = subprocess.run(command, capture_output=True, text=True, cwd=cli.root, timeout=300,
                          env={**cli.env, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "already holds a run" in done.stderr and "another process stopped on a problem" in done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("exitcode: 2") + done.stderr.count("exitcode  : 2") >= 2  # both ranks, one line each
    assert (folder / "ckpt.pt").read_bytes() == b"an earlier run"


def test_the_ranks_share_one_timestep_history_for_loss_vlb(cli, tmp_path):
    """Importance sampling draws t from the history of every rank's losses: kept alike on all ranks, it
    draws what a single process draws, once the history is full (20 t x 10 losses: step 13 or so)."""
    flags = ["--variance", "learned", "--loss", "vlb", "--max-steps", "24", "--log-every", "4"]
    _, (rank0, rank1) = torchrun(cli, tmp_path / "ddp", *flags, "--batch-size", "8",
                                 "--checkpoint-dir", tmp_path / "ddp")
    for name, w in rank0["model"].items():
        assert torch.equal(w, rank1["model"][name]), name
    single = cli.run("train.py", *FLAGS, *flags, "--batch-size", "16", "--checkpoint-dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    one, two = load_checkpoint(tmp_path / "single"), load_checkpoint(tmp_path / "ddp")
    assert (one["timestep_history"]["counts"] == 10).all()
    assert torch.equal(two["timestep_history"]["counts"], one["timestep_history"]["counts"])
    torch.testing.assert_close(two["timestep_history"]["losses"], one["timestep_history"]["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close([v for *_, v in two["history"]], [v for *_, v in one["history"]], rtol=1e-4, atol=0)


def test_ranks_that_measure_different_rates_plan_one_length(cli, tmp_path):
    """--max-minutes: every rank times its own steps; all must train the same planned steps, the shortest
    plan (here rank 0's 0.02 steps/s over 10 minutes: 11 steps; rank 1 measured twice that)."""
    _, (rank0, rank1) = torchrun(cli, tmp_path / "ddp", "--max-steps", "0", "--max-minutes", "10", "--batch-size", "8",
                                 "--checkpoint-dir", tmp_path / "ddp", env={"FAKE_STEP_RATE": "0.02"})
    ckpt = load_checkpoint(tmp_path / "ddp")
    assert ckpt["step"] == ckpt["config"]["train"]["steps"] in (10, 11)  # 97% of 0.02 x (600 s less the start-up)
    assert len(rank0["history"]) == len(rank1["history"]) == ckpt["step"]

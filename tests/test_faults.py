"""Faults from outside a run: another run on the same folder, two writers, a full disk, damaged data,
weights that are not finite, signals. Real processes and real files."""
import gzip
import os
import random
import resource
import signal
import subprocess
import sys
import threading

import pytest
import torch

import data
import sample
import train
from checkpoint import load_checkpoint
from files import atomic_write
from conftest import ROOT, leftovers, wait_for, write_idx

GARBAGE = random.Random(0).randbytes(4096)  # fixed, so every run tries the same bytes


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(cli):
    first = cli.start("train.py", "--epochs", "1000", "--checkpoint-every", "100000", "--log-every", "5")
    wait_for(first, "step 5/")
    second = cli.run("train.py", "--resume", cli.ckpt.parent / "nowhere", "--max-steps", "1")
    assert second.returncode == 2 and "does not exist" in second.stderr  # bad input is still checked first
    second = cli.run("train.py", "--max-steps", "1", "--overwrite")
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is in use by train.py (pid {first.pid}" in second.stderr
    first.kill()  # kill -9: no chance to release anything by hand
    first.communicate()
    third = cli.run("train.py", "--max-steps", "1", "--overwrite", "--sample-n", "0")
    assert third.returncode == 0, third.stderr  # a dead process's lock is no lock


def test_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two saves of the same checkpoint at once (the old fixed name .tmp made the second crash)."""
    both_open = threading.Barrier(2, timeout=60)

    def write(payload):
        def writer(f):
            f.write(payload)
            both_open.wait()  # each holds its temporary file open until the other has one too
        return writer

    threads = [threading.Thread(target=atomic_write, args=(tmp_path / "ckpt.pt", write(bytes([i]) * 1000)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "ckpt.pt").read_bytes() in (b"\0" * 1000, b"\1" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def file_size_limit(nbytes):
    """For subprocess preexec_fn: no file this process writes may grow past nbytes (writes then fail
    with EFBIG, as they would with ENOSPC on a full disk; Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing(cli):
    assert cli.run("train.py", "--max-steps", "2", "--checkpoint-every", "1", "--sample-n", "0").returncode == 0
    before = {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")}
    small = len(before["ckpt.pt"]) // 2
    r = subprocess.run(cli.command("train.py", "--max-steps", "4", "--resume", cli.ckpt), capture_output=True,
                       text=True, preexec_fn=file_size_limit(small), cwd=cli.root, timeout=600)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "could not write" in r.stderr and "ckpt.pt" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in cli.ckpt.glob("ckpt*.pt")} == before and not leftovers(cli.ckpt)

    (cli.out / "samples.png").write_bytes(b"earlier samples")
    r = subprocess.run(cli.command("sample.py", "--n", "16", "--steps", "2"), capture_output=True, text=True,
                       preexec_fn=file_size_limit(2000), cwd=cli.root, timeout=600)
    assert r.returncode == 1 and "could not write" in r.stderr and "samples.png" in r.stderr, r.stderr
    assert (cli.out / "samples.png").read_bytes() == b"earlier samples" and not leftovers(cli.out)


def damage(case, cli, fake_mnist, monkeypatch):
    """Spoil the training data the way `case` says; returns the data-dir flag to use."""
    source, arrays = fake_mnist
    raw = cli.data / "FashionMNIST" / "raw"
    if case == "truncated":
        data.prepare_fashion_mnist(cli.data)
        (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:5000])
    elif case == "corrupt gzip":
        (source / "train-images-idx3-ubyte.gz").write_bytes(GARBAGE)
    elif case == "a file":
        cli.data.write_text("not a folder")
    elif case == "labels":
        write_idx(source / "train-labels-idx1-ubyte.gz", arrays["train-labels-idx1-ubyte"][:100])
    elif case == "truncated source":  # a whole .gz of half a file: copying it would not mend anything
        gz = source / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes())[:5000]))
    elif case == "not images":
        write_idx(source / "train-images-idx3-ubyte.gz", arrays["train-images-idx3-ubyte"].reshape(256, 56, 14))


@pytest.mark.parametrize("case, message", [
    ("truncated", "train-images-idx3-ubyte is damaged: its header promises (256, 28, 28)"),
    ("corrupt gzip", "train-images-idx3-ubyte.gz (Not a gzipped file"),
    ("a file", "is a file, not a folder"),
    ("labels", "train-labels-idx1-ubyte does not match"),
    ("not images", "holds (56, 14) images, not 28x28"),
    ("truncated source", "train-images-idx3-ubyte.gz is damaged: its header promises (256, 28, 28)"),
])
def test_damaged_or_misplaced_data_is_one_line_naming_the_file(case, message, cli, fake_mnist, monkeypatch, fails):
    damage(case, cli, fake_mnist, monkeypatch)
    err = fails(train, cli.command("train.py", "--max-steps", "1")[2:])
    assert message in err
    assert not cli.ckpt.exists() or not list(cli.ckpt.glob("ckpt*"))


def test_weights_that_are_not_finite_are_refused_everywhere(good_checkpoint, tmp_path, cli, fails):
    import evaluate

    ckpt = load_checkpoint(good_checkpoint)
    name = next(iter(ckpt["ema"]))
    torch.save({**ckpt, "ema": {**ckpt["ema"], name: ckpt["ema"][name] * float("nan")}}, tmp_path / "nan.pt")
    torch.save({**ckpt, "model": {k: v / 0 if v.is_floating_point() else v for k, v in ckpt["model"].items()}},
               tmp_path / "inf.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"earlier samples")
    for bad in ("nan.pt", "inf.pt"):
        for module, flags in ((sample, ["--checkpoint"]), (evaluate, ["--checkpoint"]), (train, ["--resume"])):
            argv = [*flags, tmp_path / bad, "--output-dir", out, *(["--data-dir", cli.data, "--checkpoint-dir",
                                                                    tmp_path / "ck"] if module is train else [])]
            err = fails(module, argv)
            assert "hold NaN or Inf" in err and bad in err, (module.__name__, err)
    assert [p.name for p in out.iterdir()] == ["samples.png"] and (out / "samples.png").read_bytes() == b"earlier samples"
    # Not finite is not damaged: a folder's NaN ckpt.pt is refused, not skipped for the ckpt.prev.pt beside it
    # (even in a folder whose name says "damaged").
    folder = tmp_path / "damaged_run"
    folder.mkdir()
    (tmp_path / "nan.pt").rename(folder / "ckpt.pt")
    torch.save(ckpt, folder / "ckpt.prev.pt")
    assert "hold NaN or Inf" in fails(sample, ["--checkpoint", folder, "--output-dir", out])


@pytest.mark.slow
def test_processes_preparing_one_data_folder_at_once_all_succeed(fake_mnist, tmp_path):
    """As the first process of each machine does under torchrun, or two commands started together."""
    code = "import sys, data; data.prepare_fashion_mnist(sys.argv[1]); print(len(data.load_fashion_mnist(sys.argv[1])[0]))"
    env = {**os.environ, "FASHION_MNIST_DIR": str(fake_mnist[0]), "PYTHONPATH": str(ROOT)}
    for attempt in range(2):
        target = tmp_path / f"data{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", code, target], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(4)]
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, results
        assert [out.strip() for out, _ in results] == ["256"] * 4




def test_the_first_signal_is_recorded_and_the_second_aborts():
    """graceful_signals itself, in this process: what the loop sees after one Ctrl-C, and the abort on a
    second, with no step whose length the outcome could depend on."""
    from training import graceful_signals

    before = signal.getsignal(signal.SIGINT)
    with graceful_signals() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == ["SIGTERM"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back

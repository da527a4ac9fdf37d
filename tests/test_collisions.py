"""Outputs that name an input or a folder, and outputs nobody reads: every file a command writes is
checked before any work, so that a slip of the keyboard cannot replace a checkpoint, the data, or a
file a link points to; a closed pipe does not stop a run."""
import subprocess

import numpy as np
import pytest

import bench
import sample
from checkpoint import load_checkpoint
from cli import is_json, is_npz


@pytest.fixture
def scratch(tmp_path, good_checkpoint):
    """A folder holding a checkpoint, a gzipped data file, an earlier npz and an earlier JSON."""
    (tmp_path / "ckpt.pt").write_bytes(good_checkpoint.read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b data")
    np.savez_compressed(tmp_path / "old.npz", images=np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "old.json").write_text('{"rows": []}')
    return tmp_path


def test_earlier_outputs_are_recognised_and_nothing_else_is(scratch):
    assert is_npz(scratch / "old.npz") and not is_npz(scratch / "ckpt.pt")  # both are zip files
    assert not is_npz(scratch / "train-images-idx3-ubyte.gz") and not is_npz(scratch / "missing")
    assert is_json(scratch / "old.json") and not is_json(scratch / "ckpt.pt")


@pytest.mark.parametrize("target, message", [
    ("ckpt.pt", "exists and is not an earlier output of --save-npz"),
    ("train-images-idx3-ubyte.gz", "exists and is not an earlier output of --save-npz"),
    (".", "is a folder"),
    ("link.npz", "is a symbolic link"),
])
def test_save_npz_never_replaces_what_it_does_not_own(scratch, fails, target, message):
    (scratch / "link.npz").symlink_to(scratch / "old.json")
    before = {p.name: p.read_bytes() for p in scratch.iterdir() if p.is_file()}
    err = fails(sample, ["--checkpoint", scratch / "ckpt.pt", "--output-dir", scratch / "out", "--n", "2",
                         "--save-npz", scratch / target])
    assert message in err
    assert {p.name: p.read_bytes() for p in scratch.iterdir() if p.is_file()} == before
    assert not (scratch / "out" / "samples.png").exists()  # refused before any sampling


def test_save_npz_replaces_its_own_earlier_file_and_takes_a_long_name(scratch):
    long = scratch / ("s" * 246 + ".npz")  # 250 bytes: the temporary file's name must not overflow 255
    for path in (scratch / "old.npz", long):
        sample.main([str(a) for a in ["--checkpoint", scratch / "ckpt.pt", "--output-dir", scratch / "out",
                                      "--n", "3", "--steps", "2", "--save-npz", path]])
        assert np.load(path)["images"].shape == (3, 28, 28)
    assert not list(scratch.glob(".*.tmp"))


def test_bench_json_never_replaces_a_checkpoint(scratch, fails):
    before = (scratch / "ckpt.pt").read_bytes()
    err = fails(bench, ["--json", scratch / "ckpt.pt", "--skip", "training", "ddpm1000"])
    assert "exists and is not an earlier output of --json" in err
    assert (scratch / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_lock_that_is_a_link_or_a_folder_is_refused_and_its_target_untouched(cli, tmp_path, kind):
    cli.ckpt.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if kind == "symlink":
        (cli.ckpt / ".lock").symlink_to(precious)
    else:
        (cli.ckpt / ".lock").mkdir()
    r = cli.run("train.py", "--steps", "2", "--sample-n", "0")
    assert r.returncode == 2 and "as the folder's lock" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and precious.read_text() == "keep me"
    assert not (cli.ckpt / "ckpt.pt").exists()


def test_a_run_whose_reader_goes_away_trains_to_the_end(cli):
    """`python train.py | head -1`: the pipe closes after the first line, and the run keeps every step."""
    proc = subprocess.Popen(cli.command("train.py", "--steps", "6", "--log-every", "1", "--sample-n", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.root)
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=900) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert load_checkpoint(cli.ckpt)["step"] == 6 and (cli.out / "samples.png").is_file()


@pytest.mark.parametrize("target, message", [
    ("ckpt.pt", "is not a folder"),
    (".", "is not empty"),
    ("link", "is not a folder"),
    ("out", "is the --output-dir"),
])
def test_save_png_fills_only_a_new_or_empty_folder(scratch, fails, target, message):
    (scratch / "link").symlink_to(scratch / "empty")
    (scratch / "empty").mkdir()
    before = {p.name: p.read_bytes() for p in scratch.iterdir() if p.is_file()}
    err = fails(sample, ["--checkpoint", scratch / "ckpt.pt", "--output-dir", scratch / "out", "--n", "2",
                         "--save-png", scratch / target])
    assert message in err
    assert {p.name: p.read_bytes() for p in scratch.iterdir() if p.is_file()} == before
    assert not (scratch / "out" / "samples.png").exists() and not any((scratch / "empty").iterdir())

"""Read-only folders, as a mounted share gives them: each test mounts its folders read-only (a bind
mount in a private mount namespace, `unshare -rm`) and runs the commands as a user would. What only
reads (the data, a checkpoint to sample or score, a cached classifier) works; what must write says
so in one line, with the fix, before any work; nothing in a read-only folder changes."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# mounts each of the first $1 arguments read-only over itself, then runs the rest
MOUNT = ('n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$1" && '
         'mount -o remount,bind,ro "$1" || exit 99; shift; n=$((n - 1)); done; exec "$@"')


def _can_mount(folder):
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT, "sh", "1", folder, "true"],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def read_only(tmp_path):
    """read_only(folders, argv): run argv with those folders mounted read-only."""
    if not _can_mount(tmp_path):
        pytest.skip("this machine does not allow private read-only bind mounts (unshare -rm)")

    def run(folders, argv, **kw):
        folders = [str(f) for f in folders]
        return subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT, "sh", str(len(folders)), *folders,
                               *map(str, argv)], capture_output=True, text=True, cwd=ROOT, timeout=900, **kw)
    return run


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(r):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_the_mount_really_is_read_only(read_only, tmp_path):
    r = read_only([tmp_path], ["touch", tmp_path / "x"])
    assert r.returncode != 0 and "Read-only file system" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["data", "elsewhere"])
def test_training_reads_its_data_from_a_read_only_share(cli, fake_mnist, read_only, where, monkeypatch):
    """The IDX files in the read-only --data-dir itself, or found elsewhere for an empty one: read
    where they are, not copied."""
    cli.data.mkdir()
    if where == "data":
        for f in fake_mnist[0].iterdir():
            shutil.copy(f, cli.data)
        monkeypatch.delenv("FASHION_MNIST_DIR")
    before = snapshot(cli.data)
    r = read_only([cli.data], cli.command("train.py", "--max-steps", "2", "--sample-n", "0"), env=cli.env)
    assert r.returncode == 0, r.stderr
    assert snapshot(cli.data) == before and (cli.ckpt / "ckpt.pt").is_file()


def test_no_data_and_a_read_only_data_folder_is_one_line(tmp_path, read_only, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    (tmp_path / "share").mkdir()
    code = ("import sys; from pathlib import Path; import cli, data; data.DEBIAN_DIR = Path(sys.argv[1]); "
            "cli.run_command(data.prepare_fashion_mnist, sys.argv[2])")
    r = read_only([tmp_path / "share"], [sys.executable, "-c", code, tmp_path / "none", tmp_path / "share" / "d"])
    err = one_line_error(r)
    assert "which is read-only, so it cannot be downloaded there" in err and "choose a writable --data-dir" in err
    assert "downloading" not in r.stdout and not any((tmp_path / "share").iterdir())


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_samples_and_scores(cli, read_only, tmp_path):
    """And the evaluation classifier: refused in one line where a new one cannot be written, read
    from a read-only folder once cached."""
    assert cli.run("train.py", "--max-steps", "2", "--sample-n", "0").returncode == 0
    before = snapshot(cli.ckpt)
    r = read_only([cli.ckpt], cli.command("sample.py", "--n", "4", "--steps", "2", "--save-npz", tmp_path / "s.npz"))
    assert r.returncode == 0 and (tmp_path / "s.npz").is_file(), r.stderr
    (tmp_path / "cls").mkdir()
    evaluate = [sys.executable, ROOT / "evaluate.py", "--checkpoint", cli.ckpt, "--data-dir", cli.data,
                "--n", "20", "--steps", "2", "--output-dir", cli.out, "--classifier-dir", tmp_path / "cls"]
    r = read_only([cli.ckpt, tmp_path / "cls"], evaluate, env=cli.env)
    assert f"cannot write to {tmp_path / 'cls'}/ (Read-only file system)" in one_line_error(r)
    assert not (cli.out / "eval.json").exists()
    r = read_only([cli.ckpt], evaluate, env=cli.env)
    assert r.returncode == 0 and "cached in" in r.stdout, r.stderr
    r = read_only([cli.ckpt, tmp_path / "cls"], evaluate, env=cli.env)  # the cached classifier is only read
    assert r.returncode == 0 and "trained the evaluation classifier" not in r.stdout, r.stderr
    assert snapshot(cli.ckpt) == before


def test_resuming_in_a_read_only_folder_is_one_line_naming_the_fix(cli, read_only, tmp_path):
    assert cli.run("train.py", "--max-steps", "1", "--sample-n", "0").returncode == 0
    students = tmp_path / "students"
    r = subprocess.run([sys.executable, ROOT / "distill.py", "--teacher", cli.ckpt, "--data-dir", cli.data,
                        "--checkpoint-dir", students, "--output-dir", cli.out, "--teacher-steps", "8", "--to-steps", "4",
                        "--round-steps", "2", "--warmup-steps", "0", "--max-steps", "1", "--sample-n", "0"],
                       capture_output=True, text=True, cwd=ROOT, env=cli.env, timeout=900)
    assert r.returncode == 0, r.stderr
    before = snapshot(tmp_path)
    r = read_only([cli.ckpt], [sys.executable, ROOT / "train.py", "--resume", cli.ckpt, "--data-dir", cli.data,
                               "--output-dir", cli.out], env=cli.env)
    assert "a resumed run writes where it was saved unless given another --checkpoint-dir" in one_line_error(r)
    r = read_only([students], [sys.executable, ROOT / "distill.py", "--resume", students, "--data-dir", cli.data,
                               "--output-dir", cli.out], env=cli.env)
    assert "copy the folder somewhere writable and --resume the copy" in one_line_error(r)
    r = read_only([cli.out], cli.command("sample.py", "--n", "2"))
    assert f"cannot write to {cli.out}/" in one_line_error(r)
    assert snapshot(tmp_path) == before

"""The process's surroundings that no flag sets: a locale that cannot spell the file names a user
gives (LC_ALL=C without UTF-8, as a bare container or cron has), no usable $TMPDIR and no $HOME. The
commands run as they would, and write what they are asked to."""
import shutil

import numpy as np

# a locale whose encoding is ASCII: Python then decodes non-ASCII arguments with surrogateescape
ASCII = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def test_non_ascii_names_in_an_ascii_locale(cli, good_checkpoint, tmp_path, monkeypatch):
    for name, value in ASCII.items():
        monkeypatch.setenv(name, value)
    cli.ckpt, cli.out = tmp_path / "läufe", tmp_path / "bilder-éß"
    cli.ckpt.mkdir()
    shutil.copy(good_checkpoint, cli.ckpt / "ckpt.pt")
    npz = tmp_path / "müster.npz"
    r = cli.run("sample.py", "--n", "3", "--steps", "2", "--save-npz", npz)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (cli.out / "samples.png").is_file()
    with np.load(npz) as f:
        assert f["images"].shape == (3, 28, 28)


def test_no_usable_tmpdir_and_no_home(cli, good_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.delenv("HOME", raising=False)
    r = cli.run("sample.py", "--checkpoint", good_checkpoint, "--n", "2", "--steps", "2", "--save-npz",
                tmp_path / "s.npz")
    assert r.returncode == 0 and "Traceback" not in r.stderr and (tmp_path / "s.npz").is_file(), r.stderr

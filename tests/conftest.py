import gzip
import os

# The suite runs on the CPU, GPU machine or not: hide CUDA from this process and every process it starts,
# before torch looks, so that --preset auto and --device auto choose alike everywhere.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from methods import denoising
from training import train
from config import TrainConfig
from diffusion import DiffusionConfig
from unet import UNetConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(width=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.0)
# The tiny model, with the recipe the configs default to (unconditional, linear betas, constant learning rate,
# fp32, no planned length, no autoguidance guide): the cpu preset's 200-step warm-up would fill a tiny run, its bf16 is chosen per machine,
# and its plan would size a run by the machine's speed. test_recipe.py tests the preset.
TINY_FLAGS = ["--width", "8", "--channel-mults", "1", "2", "--attn-resolutions", "14", "--timesteps", "20",
              "--batch-size", "16", "--schedule", "linear", "--lr-schedule", "constant", "--precision", "fp32",
              "--memory-format", "contiguous", "--no-conditional", "--plan-minutes", "0",
              "--guide-fraction", "0"]


def write_idx(path, array):
    """Write a uint8 array in the IDX format of the MNIST files (gzip-compressed if path ends in .gz)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    """A folder with the four Fashion-MNIST IDX files, gzipped as Debian ships them, of random content."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (256, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(256) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (64, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(64) % 10}
    for name, arr in arrays.items():
        write_idx(folder / f"{name}.gz", arr.astype(np.uint8))
    return folder, arrays


@pytest.fixture(scope="session")
def tiny_config():
    return UNetConfig(**TINY)


class CLI:
    """Runs train.py (tiny model, fake data) and sample.py as a user would, in this test's folders."""

    root = ROOT

    def __init__(self, tmp_path):
        self.data, self.ckpt, self.out = (tmp_path / name for name in ("data", "ckpt", "out"))

    @property
    def env(self):
        return dict(os.environ)

    def command(self, script, *args):
        where = (["--data-dir", self.data, "--checkpoint-dir", self.ckpt, *TINY_FLAGS] if script == "train.py"
                 else ["--checkpoint", self.ckpt])
        return [sys.executable, str(ROOT / script), *map(str, [*where, "--output-dir", self.out, *args])]

    def run(self, script, *args):
        """Run to the end; later flags override the defaults above."""
        return subprocess.run(self.command(script, *args), capture_output=True, text=True, cwd=ROOT, timeout=900)

    def start(self, script, *args):
        return subprocess.Popen(self.command(script, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)


@pytest.fixture
def cli(tmp_path, fake_mnist, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_mnist[0]))
    return CLI(tmp_path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_run(folder, model_cfg, cfg, images=None, resume=None, loss_hook=None, diffusion_cfg=None):
    """What train.py does, minus data and figures, in-process on the CPU: set up (or resume from
    a checkpoint), train, checkpoint into folder. Returns (model, ema, state)."""
    cpu = torch.device("cpu")
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8) if images is None else images
    method, state = denoising(model_cfg, diffusion_cfg or DiffusionConfig(20), cfg, cpu,
                              resume and load_checkpoint(resume))
    d, part = method.diffusion, method.parts[0]
    if loss_hook:
        d.loss = loss_hook(d.loss)
    save = lambda: save_checkpoint(make_checkpoint(part, d, cfg.recipe(), state, 1, method.importance), folder)
    train(method, images, cfg, cpu, state, save)
    return part.model, part.ema, state


@pytest.fixture(scope="session")
def tiny_run():
    return _tiny_run


@pytest.fixture(scope="session")
def good_checkpoint(tmp_path_factory, tiny_config):
    """A real checkpoint of the tiny model (T = 20), made once per test session."""
    folder = tmp_path_factory.mktemp("good")
    _tiny_run(folder, tiny_config, TrainConfig(epochs=1, batch_size=8))
    return folder / "ckpt.pt"


@pytest.fixture
def fails(capsys):
    """fails(module, argv): module.main(argv) must exit 2 with one line on stderr, which is returned."""
    def run(module, argv):
        with pytest.raises(SystemExit) as e:
            module.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err
    return run


def wait_for(proc, text, at_start=False):
    """Read proc's stdout until a line containing text (or starting with it): by then the process has
    reached that point."""
    for line in proc.stdout:
        if line.startswith(text) if at_start else text in line:
            return
    raise AssertionError(f"the process ended without printing {text!r}: {proc.stderr.read()}")


def leftovers(folder):
    """Temporary files left in folder (a save that did not finish, or was never cleaned up)."""
    return sorted(p.name for p in folder.glob(".*.tmp"))

import gzip
import struct

import numpy as np
import pytest
import torch

from unet import UNetConfig

TINY = dict(width=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.0)


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


@pytest.fixture
def tiny_config():
    return UNetConfig(**TINY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

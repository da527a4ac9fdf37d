"""data.py: the IDX files found where they are pointed at, or the Debian package's, or a one-line way
to get them; the epoch order."""
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from cli import UserError




def test_loads_idx_files_it_is_pointed_at(fake_mnist, tmp_path, monkeypatch):
    folder, arrays = fake_mnist
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    images, labels = data.load_fashion_mnist(tmp_path / "data")
    assert images.dtype == torch.uint8 and images.shape == (256, 28, 28)
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(labels.numpy(), arrays["train-labels-idx1-ubyte"])
    # Decompressed into the data dir once: found there next time without the variable.
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert (tmp_path / "data/FashionMNIST/raw/train-images-idx3-ubyte").is_file()
    test_images, _ = data.load_fashion_mnist(tmp_path / "data", train=False)
    assert np.array_equal(test_images.numpy(), arrays["t10k-images-idx3-ubyte"])


def test_debian_package_location_is_used(fake_mnist, tmp_path, monkeypatch):
    folder, arrays = fake_mnist
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", folder)
    images, _ = data.load_fashion_mnist(tmp_path / "data")
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])


def test_missing_data_names_three_ways_to_get_it(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(UserError) as e:
        data.prepare_fashion_mnist(tmp_path / "data")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "FASHION_MNIST_DIR" in msg and "internet" in msg


@pytest.mark.skipif(data._find_idx_files(data.DEBIAN_DIR) is None and not Path("data/FashionMNIST/raw").is_dir(),
                    reason="real Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path):
    data_dir = "data" if Path("data/FashionMNIST/raw").is_dir() else tmp_path
    images, labels = data.load_fashion_mnist(data_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    x = data.to_model_range(images[:1000])
    assert x.min() == -1 and x.max() == 1 and x.shape == (1000, 1, 28, 28)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = data.epoch_batches(100, 8, seed=0, epoch=3, device="cpu")
    assert a.shape == (12, 8)
    assert len(a.unique()) == 96
    assert torch.equal(a, data.epoch_batches(100, 8, seed=0, epoch=3, device="cpu"))
    assert not torch.equal(a, data.epoch_batches(100, 8, seed=0, epoch=4, device="cpu"))

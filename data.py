"""Fashion-MNIST: found on disk (or downloaded once), kept as one uint8 tensor, shuffled by (seed, epoch)."""
import contextlib
import gzip
import io
import os
import shutil
from pathlib import Path

import torch

from sample import UserError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _find_idx_files(folder):
    """Paths of the four IDX files (plain or .gz) in folder or folder/FashionMNIST/raw, or None."""
    for d in (Path(folder), Path(folder) / "FashionMNIST" / "raw"):
        found = [next((p for p in (d / n, d / f"{n}.gz") if p.is_file()), None) for n in IDX_FILES]
        if all(found):
            return found
    return None


def prepare_fashion_mnist(data_dir):
    """Make sure data_dir/FashionMNIST/raw holds the uncompressed IDX files; return data_dir.

    Looks in data_dir, then $FASHION_MNIST_DIR, then Debian's dataset-fashion-mnist package,
    then asks torchvision to download. Found files are copied (decompressed) into data_dir once.
    """
    import torchvision

    data_dir = Path(data_dir)
    raw = data_dir / "FashionMNIST" / "raw"
    if all((raw / n).is_file() for n in IDX_FILES):
        return data_dir
    for source in (data_dir, os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR):
        files = source and _find_idx_files(source)
        if files:
            raw.mkdir(parents=True, exist_ok=True)
            for name, src in zip(IDX_FILES, files):
                tmp = raw / f"{name}.tmp"
                with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f, open(tmp, "wb") as out:
                    shutil.copyfileobj(f, out)
                os.replace(tmp, raw / name)
            return data_dir
    print(f"Fashion-MNIST not found locally; downloading it with torchvision into {data_dir}/")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its per-mirror chatter; a failure is reported below
            torchvision.datasets.FashionMNIST(data_dir, download=True)
        return data_dir
    except Exception as e:  # no network, proxy, mirror down: all end the same way for the user
        raise UserError(
            f"Fashion-MNIST not found in {data_dir}/ and the download failed ({type(e).__name__}). Get it one of "
            f"three ways: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); put the four IDX files in "
            f"{raw}/ or point $FASHION_MNIST_DIR at them; or rerun with internet access.") from None


def load_fashion_mnist(data_dir, train=True):
    """Images as one uint8 tensor [N, 28, 28] and labels [N], straight from the IDX files."""
    import torchvision

    ds = torchvision.datasets.FashionMNIST(prepare_fashion_mnist(data_dir), train=train)
    return ds.data, ds.targets


def to_model_range(images_uint8):
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [-1, 1]."""
    return images_uint8.unsqueeze(1).float() / 127.5 - 1


def epoch_batches(n, batch_size, seed, epoch, device):
    """Index batches of one epoch; the order depends only on (seed, epoch), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).to(device)
    return perm[: n // batch_size * batch_size].view(-1, batch_size)

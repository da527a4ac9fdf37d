"""Fashion-MNIST: found on disk (or downloaded once), checked, kept as one uint8 tensor, shuffled by
(seed, epoch); its class names. What the model sees of an image ([-1, 1]) is to_model_range's;
nothing here trains or draws."""
import contextlib
import gzip
import io
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from files import atomic_write
from cli import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _find_idx_files(folder):
    """Paths of the four IDX files (plain or .gz) in folder or folder/FashionMNIST/raw, or None."""
    for d in (Path(folder), Path(folder) / "FashionMNIST" / "raw"):
        found = [next((p for p in (d / n, d / f"{n}.gz") if p.is_file()), None) for n in IDX_FILES]
        if all(found):
            return found
    return None


def _fix(src):
    """How to mend a damaged IDX file src."""
    return ("get a fresh copy: apt-get install --reinstall dataset-fashion-mnist"
            if DEBIAN_DIR in src.parents else "replace it with a good copy")


def _read(src, ndim, fix=None):
    """(bytes, tensor) of the IDX file src (plain or .gz), checked: one line naming it and the fix
    (by default _fix's) if damaged."""
    fix = fix or _fix(src)
    try:
        with (gzip.open if src.suffix == ".gz" else open)(src, "rb") as f:
            content = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {src} "
                        f"({e.strerror if isinstance(e, OSError) and e.strerror else e}): "
                        f"it is damaged; {fix}") from None
    return content, parse_idx(content, ndim, src, fix)


def _writable(folder):
    """Whether folder, or the nearest folder above it that exists, can be written: not a read-only
    mount or a folder of someone else's."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK)


def prepare_fashion_mnist(data_dir):
    """The paths of the four IDX files, in IDX_FILES' order, ready for read_idx.

    Looks in data_dir/FashionMNIST/raw, data_dir, then $FASHION_MNIST_DIR, then Debian's
    dataset-fashion-mnist package, then asks torchvision to download. Found files are checked and
    copied (decompressed) into data_dir/FashionMNIST/raw once; where data_dir cannot be written (a
    read-only share), they are read where they are.
    """
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file, not a folder; point --data-dir at a "
                        f"folder (default: data)")
    raw = data_dir / "FashionMNIST" / "raw"
    if all((raw / n).is_file() for n in IDX_FILES):
        return [raw / n for n in IDX_FILES]
    writable = _writable(data_dir)
    for source in (data_dir, os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR):
        files = source and _find_idx_files(source)
        if files and not writable:
            return files
        if files:
            raw.mkdir(parents=True, exist_ok=True)
            for name, src in zip(IDX_FILES, files):
                if src != raw / name:  # checked first: a bad source would be copied forever
                    content, _ = _read(src, 3 if "images" in name else 1)
                    atomic_write(raw / name, lambda f: f.write(content))
            return [raw / n for n in IDX_FILES]
    if not writable:
        raise UserError(f"Fashion-MNIST not found in {data_dir}/, which is read-only, so it cannot "
                        f"be downloaded there: choose a writable --data-dir, or put the four IDX "
                        f"files in {data_dir}/ or point $FASHION_MNIST_DIR at them")
    print(f"Fashion-MNIST not found locally; downloading it with torchvision into {data_dir}/")
    try:
        import torchvision
        # its per-mirror chatter; a failure is reported below
        with contextlib.redirect_stdout(io.StringIO()):
            torchvision.datasets.FashionMNIST(data_dir, download=True)
        return [raw / n for n in IDX_FILES]
    except Exception as e:  # no network, proxy, mirror down: all end the same way for the user
        raise UserError(
            f"Fashion-MNIST not found in {data_dir}/ and the download failed ({type(e).__name__}). "
            f"Get it one of three ways: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); "
            f"put the four IDX files in {raw}/ or point $FASHION_MNIST_DIR at them; or rerun with "
            f"internet access.") from None


def parse_idx(raw, ndim, path, fix):
    """The bytes of a uint8 IDX file (the MNIST format: a 4-byte magic, big-endian sizes, the bytes)
    as a tensor, checked so that a truncated or foreign file is one line naming it (path) and the
    fix."""
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path} is not a uint8 IDX file with {ndim} dimension(s) (damaged?); "
                        f"{fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise UserError(f"{path} is damaged: its header promises {shape} but it holds "
                        f"{len(raw) - header} bytes of data; {fix}")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy())


def read_idx(path, ndim):
    """The IDX file at path (plain or .gz) as a tensor, checked; a copy that prepare_fashion_mnist()
    made is mended by deleting it."""
    path = Path(path)
    copy = path.name in IDX_FILES and path.parent.parts[-2:] == ("FashionMNIST", "raw")
    return _read(path, ndim, copy and f"delete {path} and run again to copy it afresh")[1]


def load_fashion_mnist(data_dir, train=True):
    """Images as one uint8 tensor [N, 28, 28] and labels [N], straight from the IDX files."""
    files = prepare_fashion_mnist(data_dir)
    images_file, labels_file = files[:2] if train else files[2:]
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{images_file} holds {tuple(images.shape[1:])} images, not 28x28; "
                        f"is it Fashion-MNIST?")
    if len(images) != len(labels) or not len(labels) or labels.max() >= len(CLASSES):
        raise UserError(f"{labels_file} does not match {images_file} "
                        f"({len(labels)} labels, each to be 0-9, for {len(images)} images); "
                        f"delete both and run again to copy them afresh")
    return images, labels.long()


def parse_class(text):
    """A class index 0-9, or its torchvision name in any case ("ankle boot"), as an int."""
    names = [c.lower() for c in CLASSES]
    if text.strip().lower() in names:
        return names.index(text.strip().lower())
    if text.strip().isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise UserError(f"unknown class {text!r}; use an index 0-9 or one of: {', '.join(CLASSES)}")


def to_model_range(images_uint8):
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [-1, 1]."""
    return images_uint8.unsqueeze(1).float() / 127.5 - 1


def epoch_batches(n, batch_size, seed, epoch, device):
    """Index batches of one epoch; the order depends only on (seed, epoch), so a resumed run sees
    the same."""
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)  # the 64 bits torch takes
    perm = torch.randperm(n, generator=g).to(device)
    return perm[: n // batch_size * batch_size].view(-1, batch_size)

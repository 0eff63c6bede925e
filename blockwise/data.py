"""Datasets, the two-view Barlow Twins augmentation, and loaders.

Datasets (``DATASETS``; ``build_datasets`` returns a :class:`DataBundle`):
- ``digits`` (default): scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10
  classes; no download), up-sampled to 32x32 RGB and kept in memory as one uint8 tensor; a fixed
  stratified 80/20 train/test split. It exists so the main command runs anywhere, offline, in
  minutes. The augmentation runs on the uint8 tensors (no PIL round trip).
- ``cifar10``: torchvision's CIFAR10 under ``data_dir`` (``download=True`` fetches it).
- ``imagefolder``: any tree ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (the
  ImageNet layout).
- ``synthetic``: random uint8 images of any size and class count, for speed and memory studies.
  Image i is generated on the fly from its own seeded generator (deterministic per index, whatever
  the worker). Its SSL views skip the augmentation by default (view 1 is the image, view 2 its
  mirror image; about 0.3 ms per pair at 224x224 in one worker), so the loader is never the
  bottleneck of a GPU throughput study; ``synthetic_augment=True`` applies the full two-view
  augmentation instead.

Augmentation (:class:`TwoViewTransform`), as the official Barlow Twins code, asymmetric:
random resized crop, horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8), grayscale (p 0.2),
Gaussian blur (view 1 always, view 2 p 0.1; sigma in [0.1, 2]; PIL's blur on PIL images, as the
official code), solarize (view 1 never, view 2 p 0.2), normalise. PIL inputs stay PIL until the
final conversion, tensors stay tensors (the faster path for each at ImageNet sizes).
Scaled for small images (<= 64 px): crop scale (0.2, 1) instead of (0.08, 1) (a 0.08 crop of a
32x32 image is 9x9 pixels), bilinear instead of bicubic resizing; below 64 px there is no blur
(as the usual CIFAR recipes; a 3x3 blur of a 32 px image erases most of it). Uses
``torchvision.transforms.v2`` (present in every torchvision this project supports, >= 0.19).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv_datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# uniform bytes: mean 127.5/255, std sqrt((256^2 - 1) / 12) / 255
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.2898, 0.2898, 0.2898)

#: the fixed seed of the digits train/test split (never changes: results stay comparable)
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
#: images at or below this size count as small: small stem, small-image augmentation
SMALL_IMAGE_MAX = 64
#: blur is skipped below this size
BLUR_MIN_SIZE = 64


@dataclass
class DataBundle:
    """What the trainer and the probe need from a dataset."""
    #: yields ((view1, view2), label), both views float tensors 3 x image_size x image_size
    train_ssl: Dataset
    #: the training images without augmentation (probe training): (image tensor, label)
    train_eval: Dataset
    #: the held-out images without augmentation: (image tensor, label)
    test_eval: Dataset
    num_classes: int
    image_size: int
    #: image_size <= 64: the small stem is the default
    small_images: bool
    name: str = ""
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD


# ---------------------------------------------------------------------------------------------
# Transforms


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor()]


class RandomGaussianBlur:
    """Gaussian blur with probability p and sigma ~ U(sigma_min, sigma_max), as the official code.

    PIL images go through PIL's ``GaussianBlur(radius=sigma)`` (the official code's call; about 5x
    faster than a 23-tap convolution at 224 px); tensors through torchvision's ``gaussian_blur``
    with ``kernel_size`` taps. Random draws use torch's RNG, so ``torch.manual_seed`` and the
    loader's per-worker seeds govern them.
    """

    def __init__(self, p: float, kernel_size: int, sigma: Tuple[float, float] = (0.1, 2.0)):
        self.p = p
        self.kernel_size = kernel_size
        self.sigma = sigma

    def __call__(self, image):
        if self.p < 1.0 and float(torch.rand(())) >= self.p:
            return image
        sigma = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return v2.functional.gaussian_blur(image, [self.kernel_size, self.kernel_size], [sigma, sigma])

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, kernel_size={self.kernel_size}, sigma={self.sigma})"


def _blur_kernel(image_size: int) -> int:
    """About 10% of the image side, odd (23 for 224, as the usual ImageNet recipes)."""
    k = int(0.1 * image_size)
    return k if k % 2 == 1 else k + 1


class TwoViewTransform:
    """The asymmetric two-view Barlow Twins augmentation; ``t(image) -> (view1, view2)``.

    Accepts PIL images and uint8 tensors (C x H x W); returns two normalised float tensors
    3 x image_size x image_size.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"TwoViewTransform: image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size
        small = image_size <= SMALL_IMAGE_MAX
        scale = (0.2, 1.0) if small else (0.08, 1.0)
        interpolation = InterpolationMode.BILINEAR if small else InterpolationMode.BICUBIC
        # PIL images stay PIL until _finish (PIL's colour ops and blur are the faster ones at
        # ImageNet sizes); uint8 tensors stay tensors
        common = [
            v2.RandomResizedCrop(image_size, scale=scale, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]

        def blur(p: float) -> list:
            if image_size < BLUR_MIN_SIZE or p == 0:
                return []
            return [RandomGaussianBlur(p, _blur_kernel(image_size))]

        # solarize at 128 of 255: it runs on uint8 images (or PIL), before ToDtype
        self.view1 = v2.Compose(common + blur(1.0) + _finish(mean, std))
        self.view2 = v2.Compose(common + blur(0.1) + [v2.RandomSolarize(threshold=128, p=0.2)]
                                + _finish(mean, std))

    def __call__(self, image) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)

    def __repr__(self) -> str:
        return f"TwoViewTransform(image_size={self.image_size},\n view1={self.view1},\n view2={self.view2})"


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """No augmentation: resize (shorter side to image_size * 256/224 for large images, to
    image_size for small ones), centre crop, normalise."""
    resize = image_size if image_size <= SMALL_IMAGE_MAX else int(round(image_size * 256 / 224))
    return v2.Compose([
        v2.Resize(resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(image_size),
    ] + _finish(mean, std))


# ---------------------------------------------------------------------------------------------
# Dataset wrappers


class TransformedDataset(Dataset):
    """``(transform(image), label)`` for each ``(image, label)`` of a base dataset."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class TensorImages(Dataset):
    """Images held as one uint8 tensor N x 3 x H x W with int labels; an optional transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"TensorImages: expected uint8 N x C x H x W images, got {images.dtype} "
                            f"{tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"TensorImages: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


class NormalizedTensors(Dataset):
    """Pre-normalised float images (the whole eval set converted once: the probe reads it fast)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float]):
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images = (images.float() / 255 - m) / s
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class SyntheticImages(Dataset):
    """Random uint8 images, deterministic per index: image i comes from a generator seeded with
    (seed, i), so any worker, any epoch, any order gives the same image and label.

    ``mode="ssl"`` yields ((view1, view2), label); ``mode="eval"`` yields (image, label); images
    are normalised float tensors. Without ``augment`` the SSL views are the image and its mirror
    (cheap: for throughput studies); with ``augment`` (a TwoViewTransform) the full augmentation.
    """

    def __init__(self, length: int, image_size: int, num_classes: int, seed: int, mode: str,
                 augment: Optional[Callable] = None, mean: Sequence[float] = SYNTHETIC_MEAN,
                 std: Sequence[float] = SYNTHETIC_STD):
        if mode not in ("ssl", "eval"):
            raise ValueError(f"SyntheticImages: mode must be 'ssl' or 'eval', got {mode!r}")
        self.length = length
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.mode = mode
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.length

    def raw(self, i: int) -> Tuple[torch.Tensor, int]:
        """The uint8 image 3 x S x S and the label of index i."""
        if not 0 <= i < self.length:
            raise IndexError(f"SyntheticImages: index {i} out of range [0, {self.length})")
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        n = 3 * self.image_size * self.image_size
        # random int64 words viewed as bytes: ~4x faster than drawing bytes one by one
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), generator=g, dtype=torch.int64)
        image = words.view(torch.uint8)[:n].view(3, self.image_size, self.image_size)
        return image, label

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float().mul_(1 / 255) - self.mean) / self.std

    def __getitem__(self, i: int):
        image, label = self.raw(i)
        if self.mode == "eval":
            return self._normalize(image), label
        if self.augment is not None:
            return self.augment(image), label
        view1 = self._normalize(image)
        return (view1, view1.flip(-1)), label


# ---------------------------------------------------------------------------------------------
# Builders


DEFAULT_IMAGE_SIZE = {"digits": 32, "cifar10": 32, "imagefolder": 224, "synthetic": 224}


def _digits_tensors(image_size: int):
    """(train images, train labels, test images, test labels): uint8 N x 3 x S x S, int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0)  # N x 8 x 8, ink 0..16
    x = F.interpolate(x[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp_(0, 1) * 255).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target).long()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _build_digits(data_dir, image_size, download, synthetic_size, num_classes, seed,
                  synthetic_augment) -> DataBundle:
    del data_dir, download, synthetic_size, num_classes, seed, synthetic_augment  # embedded data
    x_train, y_train, x_test, y_test = _digits_tensors(image_size)
    mean = tuple([x_train.float().mean().item() / 255] * 3)
    std = tuple([x_train.float().std().item() / 255] * 3)
    return DataBundle(
        train_ssl=TensorImages(x_train, y_train, TwoViewTransform(image_size, mean, std)),
        train_eval=NormalizedTensors(x_train, y_train, mean, std),
        test_eval=NormalizedTensors(x_test, y_test, mean, std),
        num_classes=10, image_size=image_size, small_images=image_size <= SMALL_IMAGE_MAX,
        name="digits", mean=mean, std=std)


def _require_dir(name: str, data_dir, hint: str) -> str:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(f"dataset {name!r} needs a data directory (--data-dir); {hint}")
    data_dir = os.fspath(data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"dataset {name!r}: data directory {data_dir!r} exists and is not "
                                f"a directory; {hint}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"dataset {name!r}: data directory {data_dir!r} does not exist; {hint}")
    return data_dir


def _build_cifar10(data_dir, image_size, download, synthetic_size, num_classes, seed,
                   synthetic_augment) -> DataBundle:
    del synthetic_size, num_classes, seed, synthetic_augment
    hint = "pass --download to fetch CIFAR-10 (about 170 MB) into it"
    if download:
        if data_dir is None or str(data_dir) == "":
            raise ValueError(f"dataset 'cifar10' needs a data directory (--data-dir); {hint}")
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as err:  # a file in the way, no permission
            raise FileNotFoundError(f"dataset 'cifar10': cannot create the data directory "
                                    f"{os.fspath(data_dir)!r} for --download: {err}") from None
    data_dir = _require_dir("cifar10", data_dir, hint)
    try:
        train = tv_datasets.CIFAR10(data_dir, train=True, download=download)
        test = tv_datasets.CIFAR10(data_dir, train=False, download=download)
    except (RuntimeError, OSError) as err:  # "Dataset not found or corrupted", URLError, ...
        if download:
            raise FileNotFoundError(f"dataset 'cifar10': --download into {data_dir!r} failed "
                                    f"({type(err).__name__}: {err}); check the network, or put "
                                    "torchvision's cifar-10-batches-py/ there yourself") from None
        raise FileNotFoundError(f"dataset 'cifar10': no valid CIFAR-10 (torchvision format, "
                                f"cifar-10-batches-py/) under {data_dir!r} ({err}); {hint}") from None
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    return DataBundle(
        train_ssl=TransformedDataset(train, TwoViewTransform(image_size, mean, std)),
        train_eval=TransformedDataset(train, eval_transform(image_size, mean, std)),
        test_eval=TransformedDataset(test, eval_transform(image_size, mean, std)),
        num_classes=10, image_size=image_size, small_images=image_size <= SMALL_IMAGE_MAX,
        name="cifar10", mean=mean, std=std)


def _build_imagefolder(data_dir, image_size, download, synthetic_size, num_classes, seed,
                       synthetic_augment) -> DataBundle:
    del synthetic_size, num_classes, seed, synthetic_augment
    hint = "it must hold train/<class>/<images> and val/<class>/<images> (the ImageNet layout)"
    if download:
        raise ValueError("dataset 'imagefolder' cannot be downloaded; point --data-dir at a tree "
                         "with train/ and val/")
    data_dir = _require_dir("imagefolder", data_dir, hint)
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, split)
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileNotFoundError(f"dataset 'imagefolder': {path!r} exists and is not a "
                                    f"directory; {hint}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"dataset 'imagefolder': {path!r} does not exist; {hint}")
        try:
            splits[split] = tv_datasets.ImageFolder(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"dataset 'imagefolder': {path!r}: {err}; {hint}") from None
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        raise ValueError(f"dataset 'imagefolder': train/ and val/ have different classes "
                         f"({len(train.classes)} vs {len(val.classes)}; first differences: "
                         f"{sorted(set(train.classes) ^ set(val.classes))[:5]})")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    return DataBundle(
        train_ssl=TransformedDataset(train, TwoViewTransform(image_size, mean, std)),
        train_eval=TransformedDataset(train, eval_transform(image_size, mean, std)),
        test_eval=TransformedDataset(val, eval_transform(image_size, mean, std)),
        num_classes=len(train.classes), image_size=image_size,
        small_images=image_size <= SMALL_IMAGE_MAX, name="imagefolder", mean=mean, std=std)


def _build_synthetic(data_dir, image_size, download, synthetic_size, num_classes, seed,
                     synthetic_augment) -> DataBundle:
    del data_dir, download
    if not isinstance(synthetic_size, int) or synthetic_size <= 0:
        raise ValueError(f"dataset 'synthetic': synthetic_size must be a positive int, got {synthetic_size!r}")
    if num_classes is None:
        num_classes = 10
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"dataset 'synthetic': num_classes must be a positive int, got {num_classes!r}")
    mean, std = SYNTHETIC_MEAN, SYNTHETIC_STD
    augment = TwoViewTransform(image_size, mean, std) if synthetic_augment else None
    test_size = max(1, synthetic_size // 5)
    # three disjoint seed streams: train, (train again for eval: same images), test
    return DataBundle(
        train_ssl=SyntheticImages(synthetic_size, image_size, num_classes, seed, "ssl", augment),
        train_eval=SyntheticImages(synthetic_size, image_size, num_classes, seed, "eval"),
        test_eval=SyntheticImages(test_size, image_size, num_classes, seed + 1_000_000_007, "eval"),
        num_classes=num_classes, image_size=image_size, small_images=image_size <= SMALL_IMAGE_MAX,
        name="synthetic", mean=mean, std=std)


#: dataset name -> builder(data_dir, image_size, download, synthetic_size, num_classes, seed,
#: synthetic_augment) -> DataBundle
DATASETS: Dict[str, Callable[..., DataBundle]] = {
    "digits": _build_digits,
    "cifar10": _build_cifar10,
    "imagefolder": _build_imagefolder,
    "synthetic": _build_synthetic,
}


def build_datasets(name: str = "digits", data_dir=None, image_size: Optional[int] = None,
                   download: bool = False, synthetic_size: int = 4096,
                   num_classes: Optional[int] = None, seed: int = 0,
                   synthetic_augment: bool = False) -> DataBundle:
    """Build a dataset from ``DATASETS``.

    ``image_size=None`` takes the dataset's natural size (``DEFAULT_IMAGE_SIZE``: 16 for digits,
    32 for cifar10, 224 for imagefolder and synthetic). ``num_classes``, ``synthetic_size``,
    ``seed`` and ``synthetic_augment`` concern ``synthetic`` only (the other datasets count
    their classes). A missing data directory raises FileNotFoundError (ValueError when none is
    given); an unknown name raises ValueError listing the valid ones.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE[name]
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    return DATASETS[name](data_dir, image_size, download, synthetic_size, num_classes, seed,
                          synthetic_augment)


# ---------------------------------------------------------------------------------------------
# Loader


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs from the per-worker torch seed (torch seeds itself)."""
    del worker_id
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, pin_memory: bool,
                 drop_last: bool, seed: int, distributed: bool = False) -> DataLoader:
    """A DataLoader; reproducible order from ``seed``; pinned memory only when CUDA exists.

    ``distributed=True`` shards with a DistributedSampler (call ``loader.sampler.set_epoch(e)``
    every epoch). Workers stay alive across epochs (``persistent_workers``).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"build_loader: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"build_loader: workers must be an int >= 0, got {workers!r}")
    sampler = None
    n = len(dataset)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        n = sampler.num_samples
        shuffle = False
    if drop_last and n < batch_size:
        raise ValueError(f"build_loader: {n} samples (per process) are fewer than batch_size "
                         f"{batch_size} with drop_last=True: no batch at all; lower the batch size")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(), drop_last=drop_last,
        generator=generator, worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

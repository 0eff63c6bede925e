"""blockwise.data: the embedded digits, synthetic images, image folders, augmentation, loaders."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from blockwise.data import (DATASETS, DIGITS_TEST_FRACTION, RandomGaussianBlur, TwoViewTransform,
                            build_datasets, build_loader)


@pytest.fixture(scope="module")
def digits():
    return build_datasets("digits")


def _stack(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def test_digits_shapes_labels_and_split(digits):
    assert digits.num_classes == 10 and digits.image_size == 32 and digits.small_images
    n_train, n_test = len(digits.train_eval), len(digits.test_eval)
    assert n_train + n_test == 1797 and len(digits.train_ssl) == n_train
    assert n_test == pytest.approx(DIGITS_TEST_FRACTION * 1797, abs=1)
    x_train, y_train = _stack(digits.train_eval)
    x_test, y_test = _stack(digits.test_eval)
    assert x_train.shape == (n_train, 3, 32, 32) and x_train.dtype == torch.float32
    # stratified: every class in both splits, in about the same proportion
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    frac = torch.bincount(y_test, minlength=10).float() / torch.bincount(y_train, minlength=10).float()
    assert ((frac - 0.25).abs() < 0.05).all(), frac
    # normalised with the training set's statistics; grey images (three equal channels)
    assert abs(x_train.mean().item()) < 1e-3 and abs(x_train.std().item() - 1) < 1e-2
    assert torch.equal(x_train[:, 0], x_train[:, 2])
    # the split is a partition: no training image appears in the test set
    train_keys = {tuple(img.flatten().tolist()) for img in x_train[:, 0, ::4, ::4]}
    overlap = sum(tuple(img.flatten().tolist()) in train_keys for img in x_test[:, 0, ::4, ::4])
    assert overlap < 5  # a few digits may coincide at this resolution; a leaked split would not


def test_digits_split_is_deterministic(digits):
    again = build_datasets("digits")
    for a, b in ((digits.train_eval, again.train_eval), (digits.test_eval, again.test_eval)):
        xa, ya = _stack(a)
        xb, yb = _stack(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_digits_two_views_differ_and_follow_the_seed(digits):
    torch.manual_seed(1)
    (v1, v2_), label = digits.train_ssl[7]
    assert v1.shape == v2_.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert type(v1) is torch.Tensor  # plain tensors, not tv_tensors subclasses
    assert isinstance(label, int) and 0 <= label < 10
    assert not torch.equal(v1, v2_)
    torch.manual_seed(1)
    (w1, w2), _ = digits.train_ssl[7]
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)


def test_digits_other_image_size():
    bundle = build_datasets("digits", image_size=48)
    (v1, _), _ = bundle.train_ssl[0]
    assert v1.shape == (3, 48, 48) and bundle.test_eval[0][0].shape == (3, 48, 48)


def _contains(transform, cls) -> bool:
    """Whether a (nested) v2 pipeline contains a transform of this class."""
    if isinstance(transform, cls):
        return True
    return any(_contains(t, cls) for t in getattr(transform, "transforms", []))


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_two_view_transform(size, kind):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(array) if kind == "pil" else torch.from_numpy(array).permute(2, 0, 1).contiguous()
    t = TwoViewTransform(size)
    v1, v2_ = t(image)
    assert v1.shape == v2_.shape == (3, size, size)
    assert v1.dtype == torch.float32 and type(v1) is torch.Tensor
    assert not torch.equal(v1, v2_)
    # the asymmetry of the official recipe: blur (large images only) and solarize on view 2 only
    blur1 = [m for m in t.view1.transforms if isinstance(m, RandomGaussianBlur)]
    blur2 = [m for m in t.view2.transforms if isinstance(m, RandomGaussianBlur)]
    assert [m.p for m in blur1] == ([1.0] if size >= 64 else [])
    assert [m.p for m in blur2] == ([0.1] if size >= 64 else [])
    assert not _contains(t.view1, v2.RandomSolarize) and _contains(t.view2, v2.RandomSolarize)
    crop = [m for m in t.view1.transforms if isinstance(m, v2.RandomResizedCrop)][0]
    assert crop.scale == ((0.2, 1.0) if size <= 64 else (0.08, 1.0))


def test_two_view_transform_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        TwoViewTransform(0)


# ---------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_per_index():
    a = build_datasets("synthetic", image_size=24, synthetic_size=16, num_classes=7, seed=3)
    b = build_datasets("synthetic", image_size=24, synthetic_size=16, num_classes=7, seed=3)
    assert a.num_classes == 7 and len(a.train_ssl) == 16 and a.image_size == 24
    # same index, same image, whatever the object and the order of access
    for i in (5, 0, 15, 5):
        xa, ya = a.train_eval[i]
        xb, yb = b.train_eval[i]
        assert torch.equal(xa, xb) and ya == yb and 0 <= ya < 7
        assert xa.shape == (3, 24, 24) and xa.dtype == torch.float32
    assert not torch.equal(a.train_eval[0][0], a.train_eval[1][0])
    c = build_datasets("synthetic", image_size=24, synthetic_size=16, num_classes=7, seed=4)
    assert not torch.equal(a.train_eval[0][0], c.train_eval[0][0])
    # the test set is other images
    assert not torch.equal(a.test_eval[0][0], a.train_eval[0][0])
    # roughly normalised uniform bytes, all labels used
    x = torch.stack([a.train_eval[i][0] for i in range(16)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    big = build_datasets("synthetic", image_size=8, synthetic_size=200, num_classes=7)
    assert len({big.train_eval[i][1] for i in range(200)}) == 7


def test_synthetic_views():
    bundle = build_datasets("synthetic", image_size=20, synthetic_size=4)
    (v1, v2_), label = bundle.train_ssl[2]
    image, label_eval = bundle.train_eval[2]
    assert label == label_eval
    assert torch.equal(v1, image) and torch.equal(v2_, image.flip(-1))  # cheap views, documented
    augmented = build_datasets("synthetic", image_size=20, synthetic_size=4, synthetic_augment=True)
    (a1, a2), _ = augmented.train_ssl[2]
    assert a1.shape == a2.shape == (3, 20, 20) and not torch.equal(a1, a2)


def test_synthetic_normalisation_gives_unit_std():
    """Uniform bytes have std sqrt((256^2 - 1) / 12) / 255 = 0.2898 (0.2887 = 1/sqrt(12) is the
    continuous uniform's and left the normalised pixels at std 1.004)."""
    from blockwise.data import SYNTHETIC_STD

    assert SYNTHETIC_STD[0] == pytest.approx(((256 ** 2 - 1) / 12) ** 0.5 / 255, abs=1e-4)
    bundle = build_datasets("synthetic", image_size=224, synthetic_size=8)
    x = torch.stack([bundle.train_eval[i][0] for i in range(8)])  # 1.2 M pixels
    assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 1) < 2e-3, x.std().item()


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="synthetic_size"):
        build_datasets("synthetic", synthetic_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_datasets("synthetic", num_classes=0)


# ---------------------------------------------------------------------------------------------
# Image folders, CIFAR-10, bad input


def _make_tree(root, classes=("cat", "dog"), per_class=3, size=(40, 36), splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(per_class):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("image_size", [32, 72])
def test_imagefolder(tmp_path, image_size):
    _make_tree(tmp_path)
    bundle = build_datasets("imagefolder", tmp_path, image_size=image_size)
    assert bundle.num_classes == 2 and bundle.image_size == image_size
    assert bundle.small_images == (image_size <= 64)
    assert len(bundle.train_ssl) == len(bundle.train_eval) == 6 and len(bundle.test_eval) == 6
    (v1, v2_), label = bundle.train_ssl[4]
    assert v1.shape == v2_.shape == (3, image_size, image_size) and label == 1
    x, label = bundle.test_eval[0]
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32 and label == 0
    # no augmentation in the eval views: deterministic
    assert torch.equal(bundle.train_eval[3][0], bundle.train_eval[3][0])


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets("imagefolder", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data-dir"):
        build_datasets("imagefolder", None)
    _make_tree(tmp_path / "a", splits=("train",))
    with pytest.raises(FileNotFoundError, match="val"):
        build_datasets("imagefolder", tmp_path / "a")
    _make_tree(tmp_path / "b", splits=("train",), classes=("cat", "dog"))
    _make_tree(tmp_path / "b", splits=("val",), classes=("cat", "eel"))
    with pytest.raises(ValueError, match="different classes"):
        build_datasets("imagefolder", tmp_path / "b")


def test_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    """A file where a directory should be was reported as 'does not exist'."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for name in ("imagefolder", "cifar10"):
        with pytest.raises(FileNotFoundError, match="exists and is not a directory"):
            build_datasets(name, a_file)
    _make_tree(tmp_path / "tree", splits=("val",))
    (tmp_path / "tree" / "train").write_text("x")
    with pytest.raises(FileNotFoundError, match="train.* exists and is not a directory"):
        build_datasets("imagefolder", tmp_path / "tree")


def test_cifar10_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        build_datasets("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--download"):
        build_datasets("cifar10", tmp_path)  # exists, but holds no CIFAR-10: nothing is fetched
    assert os.listdir(tmp_path) == []


def test_cifar10_download_failures_are_clear_errors(tmp_path, monkeypatch):
    import urllib.error

    from blockwise import data as data_mod

    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("x")
    with pytest.raises(FileNotFoundError, match="cannot create the data directory"):
        build_datasets("cifar10", in_the_way / "cifar", download=True)

    def offline(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data_mod.tv_datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="--download into .* failed .*URLError.*no route"):
        build_datasets("cifar10", tmp_path / "cifar", download=True)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_download_under_torchrun_happens_once_per_machine(monkeypatch, local_rank):
    """Local rank 0 downloads before the barrier, the other ranks read after it."""
    from blockwise import trainer as trainer_mod
    from blockwise.config import Config
    from blockwise.trainer import DistInfo, build_bundle

    events = []
    monkeypatch.setattr(trainer_mod.data, "build_datasets",
                        lambda name, data_dir, image_size, download, *a: events.append(
                            ("build", download)) or "bundle")
    cfg = Config(dataset="cifar10", data_dir="/x", download=True, device="cpu")
    info = DistInfo(rank=local_rank, world_size=2, local_rank=local_rank)
    assert build_bundle(cfg, info, barrier=lambda: events.append("barrier")) == "bundle"
    assert events == ([("build", True), "barrier"] if local_rank == 0
                      else ["barrier", ("build", False)])
    events.clear()
    assert build_bundle(cfg, DistInfo(), barrier=lambda: events.append("barrier")) == "bundle"
    assert events == [("build", True)]  # a single process: no barrier


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="cifar10.*digits.*imagefolder.*synthetic"):
        build_datasets("mnist")
    assert set(DATASETS) == {"digits", "cifar10", "imagefolder", "synthetic"}
    with pytest.raises(ValueError, match="image_size"):
        build_datasets("synthetic", image_size=4)


# ---------------------------------------------------------------------------------------------
# Loaders


def test_loader_batches_order_and_workers():
    bundle = build_datasets("synthetic", image_size=16, synthetic_size=40)
    loader = build_loader(bundle.train_ssl, 8, shuffle=True, workers=0, pin_memory=True,
                          drop_last=True, seed=5)
    batches = list(loader)
    assert len(batches) == 5
    (v1, v2_), y = batches[0]
    assert v1.shape == v2_.shape == (8, 3, 16, 16) and y.shape == (8,) and y.dtype == torch.int64
    # the seed fixes the order; another seed gives another order
    again = [b[1] for b in build_loader(bundle.train_ssl, 8, True, 0, False, True, seed=5)]
    other = [b[1] for b in build_loader(bundle.train_ssl, 8, True, 0, False, True, seed=6)]
    assert all(torch.equal(a, b[1]) for a, b in zip(again, batches))
    assert not all(torch.equal(a, b) for a, b in zip(again, other))
    # worker processes give the same data (per-index generation; everything pickles)
    in_order = build_loader(bundle.train_eval, 10, False, 0, False, False, seed=0)
    workers = build_loader(bundle.train_eval, 10, False, 2, False, False, seed=0)
    for (xa, ya), (xb, yb) in zip(in_order, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_bad_arguments():
    bundle = build_datasets("synthetic", image_size=8, synthetic_size=10)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_loader(bundle.train_ssl, 16, True, 0, False, True, seed=0)
    assert len(build_loader(bundle.train_ssl, 16, True, 0, False, False, seed=0)) == 1
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(bundle.train_ssl, 0, True, 0, False, True, seed=0)
    with pytest.raises(ValueError, match="workers"):
        build_loader(bundle.train_ssl, 2, True, -1, False, True, seed=0)


def test_loader_distributed_sampler(tmp_path):
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bundle = build_datasets("synthetic", image_size=8, synthetic_size=12)
        loader = build_loader(bundle.train_eval, 4, True, 0, False, True, seed=0, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        labels = torch.cat([y for _, y in loader])
        assert labels.numel() == 12
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_random_gaussian_blur(kind):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    image = Image.fromarray(array) if kind == "pil" else torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def as_tensor(img):
        return v2.functional.pil_to_tensor(img) if kind == "pil" else img

    blurred = as_tensor(RandomGaussianBlur(1.0, 7, sigma=(1.5, 2.0))(image)).float()
    original = as_tensor(image).float()
    assert blurred.shape == original.shape
    # blurring noise lowers its variance a lot; the mean stays
    assert blurred.std() < 0.6 * original.std()
    assert abs(blurred.mean() - original.mean()) < 5
    assert RandomGaussianBlur(0.0, 7)(image) is image

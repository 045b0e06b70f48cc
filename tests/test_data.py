"""Datasets: shapes, deterministic splits, batches as a pure function of
(seed, step), augmentation of images and sequences (mnist1d:
tests/test_mnist1d_data.py)."""

import pickle

import ml_collections
import numpy as np
import pytest

from rtjax import config as config_lib
from rtjax.checkpoint import checkpoint_dataset
from rtjax.data import (TrainBatches, cifar10, dataset_names, dataset_spec,
                        eval_batches, load_dataset)
from rtjax.data.batches import shift_and_flip
from rtjax.data.dataset import Split
from rtjax.errors import ConfigError, DataError


def data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="digits", dir="", val_fraction=0.1, test_fraction=0.2))
  config.update(overrides)
  return config


@pytest.mark.parametrize("name,shape", [("digits", (8, 8, 1)),
                                        ("digits32", (32, 32, 3))])
def test_digits_shapes_and_sizes(name, shape):
  ds = load_dataset(data_config(name=name), seed=0)
  assert ds.input_shape == shape and ds.num_classes == 10
  assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
  assert len(ds.test) == pytest.approx(0.2 * 1797, abs=1)
  assert len(ds.val) == pytest.approx(0.1 * 1797, abs=1)
  for split in (ds.train, ds.val, ds.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == shape
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert set(np.unique(split.labels)) == set(range(10))  # stratified


def test_digits32_is_digits_resized():
  small = load_dataset(data_config(name="digits"), seed=3)
  big = load_dataset(data_config(name="digits32"), seed=3)
  np.testing.assert_array_equal(small.test.labels, big.test.labels)
  # Same split, channels identical, and the 8x8 average of each image matches.
  np.testing.assert_array_equal(big.test.images[..., 0], big.test.images[..., 2])
  pooled = big.test.images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
  assert np.corrcoef(pooled.ravel(), small.test.images.ravel())[0, 1] > 0.95


def test_splits_are_deterministic_by_seed():
  a = load_dataset(data_config(), seed=0)
  b = load_dataset(data_config(), seed=0)
  c = load_dataset(data_config(), seed=1)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(a, split).images,
                                  getattr(b, split).images)
  assert not np.array_equal(a.test.images, c.test.images)


def test_train_batches_are_a_pure_function_of_seed_and_step():
  split = load_dataset(data_config(), seed=0).train
  walked = TrainBatches(split, 32, seed=5, max_shift=1)
  sequence = [walked.batch(step) for step in range(100)]
  fresh = TrainBatches(split, 32, seed=5, max_shift=1)
  for step in (99, 0, 57, 40):  # any order, new instance: same batches
    np.testing.assert_array_equal(fresh.batch(step)[0], sequence[step][0])
    np.testing.assert_array_equal(fresh.batch(step)[1], sequence[step][1])
  other_seed = TrainBatches(split, 32, seed=6, max_shift=1)
  assert not np.array_equal(other_seed.batch(0)[0], sequence[0][0])


def test_an_epoch_visits_each_example_once():
  split = Split(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1),
                np.arange(10, dtype=np.int32))
  batches = TrainBatches(split, 3, seed=0)
  epoch = np.concatenate([batches.batch(s)[1] for s in range(3)])
  assert len(set(epoch.tolist())) == 9  # 3 batches of 3, remainder dropped
  next_epoch = np.concatenate([batches.batch(s)[1] for s in range(3, 6)])
  assert not np.array_equal(epoch, next_epoch)  # reshuffled


def test_shift_augmentation_moves_content_without_changing_it():
  image = np.zeros((1, 8, 8, 1), np.float32)
  image[0, 3, 4, 0] = 1.0
  split = Split(np.repeat(image, 64, axis=0), np.zeros(64, np.int32))
  images, _ = TrainBatches(split, 64, seed=0, max_shift=2).batch(0)
  assert np.all(images.sum(axis=(1, 2, 3)) == 1.0)  # the pixel stays inside
  rows, cols = np.nonzero(images[..., 0])[1:]
  assert set(rows) <= set(range(1, 6)) and set(cols) <= set(range(2, 7))
  assert len(set(zip(rows, cols))) > 10  # many different shifts


def reference_shift_and_flip(inputs, rng, max_shift, random_flip):
  """Example by example: offsets drawn (axis, example) for every axis between
  batch and channels, a window of the zero-padded example, then a flip of the
  last such axis. For images this is what shift_and_flip always did."""
  batch, *spatial, _ = inputs.shape
  out = inputs.copy()
  if max_shift > 0:
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(spatial), batch))
    for b in range(batch):
      padded = np.pad(inputs[b], [(max_shift, max_shift)] * len(spatial)
                      + [(0, 0)])
      out[b] = padded[tuple(slice(o, o + n)
                            for o, n in zip(offsets[:, b], spatial))]
  if random_flip:
    for b in np.nonzero(rng.random(batch) < 0.5)[0]:
      out[b] = np.flip(out[b], axis=-2)
  return out


@pytest.mark.parametrize("shape", [(16, 8, 8, 1), (16, 5, 7, 3), (16, 40, 1),
                                   (16, 12, 2)])
@pytest.mark.parametrize("max_shift,random_flip", [(0, True), (2, False),
                                                   (3, True)])
def test_shift_and_flip_matches_the_reference_for_images_and_sequences(
    shape, max_shift, random_flip):
  inputs = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  got = shift_and_flip(inputs, np.random.default_rng(2), max_shift, random_flip)
  expected = reference_shift_and_flip(inputs, np.random.default_rng(2),
                                      max_shift, random_flip)
  assert got.shape == shape and got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)


def test_sequence_flip_reverses_time_only():
  sequences = np.arange(32 * 6 * 2, dtype=np.float32).reshape(32, 6, 2)
  split = Split(sequences, np.zeros(32, np.int32))
  flipped, _ = TrainBatches(split, 32, seed=0, random_flip=True).batch(0)
  plain, _ = TrainBatches(split, 32, seed=0).batch(0)
  reversed_rows = [np.array_equal(f, p[::-1]) for f, p in zip(flipped, plain)]
  kept_rows = [np.array_equal(f, p) for f, p in zip(flipped, plain)]
  assert all(r != k for r, k in zip(reversed_rows, kept_rows))
  assert 0 < sum(reversed_rows) < 32


def test_inputs_without_a_spatial_axis_pass_unchanged():
  features = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
  split = Split(features, np.zeros(8, np.int32))
  inputs, _ = TrainBatches(split, 8, seed=0, max_shift=2, random_flip=True,
                           ).batch(0)
  plain, _ = TrainBatches(split, 8, seed=0).batch(0)
  np.testing.assert_array_equal(inputs, plain)


def test_eval_batches_pad_and_mask():
  split = Split(np.ones((5, 2, 2, 1), np.float32), np.arange(5, dtype=np.int32))
  batches = list(eval_batches(split, 2))
  assert [b[0].shape[0] for b in batches] == [2, 2, 2]
  assert batches[-1][2].tolist() == [True, False]
  assert np.concatenate([b[1][b[2]] for b in batches]).tolist() == [0, 1, 2, 3, 4]


def write_cifar_batches(directory, per_batch=8, seed=0):
  """Files in the exact format of cifar-10-batches-py, with random pixels."""
  rng = np.random.default_rng(seed)
  written = {}
  for name in (*cifar10.TRAIN_FILES, cifar10.TEST_FILE):
    data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    labels = [int(i % 10) for i in range(per_batch)]
    with open(directory / name, "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"labels": labels,
                   b"data": data, b"filenames": [b"x.png"] * per_batch}, f)
    written[name] = (data, labels)
  return written


def test_cifar10_loader_reads_python_batches(tmp_path):
  written = write_cifar_batches(tmp_path)
  ds = load_dataset(data_config(name="cifar10", dir=str(tmp_path),
                                val_fraction=0.25), seed=0)
  assert ds.input_shape == (32, 32, 3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 8)
  # Channel-planar rows become HWC images, normalized per channel.
  data, labels = written[cifar10.TEST_FILE]
  expected = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
  expected = (expected - cifar10.MEAN) / cifar10.STD
  np.testing.assert_allclose(ds.test.images, expected, rtol=1e-5, atol=1e-5)
  assert ds.test.labels.tolist() == labels


def test_cifar10_missing_files_named(tmp_path):
  write_cifar_batches(tmp_path)
  (tmp_path / "data_batch_3").unlink()
  with pytest.raises(DataError, match=r"missing data_batch_3.*test_batch"):
    load_dataset(data_config(name="cifar10", dir=str(tmp_path)), seed=0)
  with pytest.raises(DataError, match="does-not-exist does not exist"):
    load_dataset(data_config(name="cifar10", dir=str(tmp_path / "does-not-exist")),
                 seed=0)
  with pytest.raises(DataError, match="is a file, not a directory"):
    load_dataset(data_config(name="cifar10", dir=str(tmp_path / "data_batch_1")),
                 seed=0)
  with pytest.raises(DataError, match="needs data.dir"):
    load_dataset(data_config(name="cifar10"), seed=0)


def _truncated(path):
  path.write_bytes(path.read_bytes()[:100])


def _garbage(path):
  path.write_bytes(b"this is not a pickle\n" * 10)


def _wrong_structure(path):
  with open(path, "wb") as f:
    pickle.dump([1, 2, 3], f)


def _missing_labels(path):
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)


def _wrong_pixel_count(path):
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)


def _label_count_mismatch(path):
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)


@pytest.mark.parametrize("name", ["data_batch_2", "test_batch"])
@pytest.mark.parametrize("corrupt,detail", [
    (_truncated, "not a readable python batch"),
    (_garbage, "not a readable python batch"),
    (_wrong_structure, "holds a list"),
    (_missing_labels, "no b'labels' key"),
    (_wrong_pixel_count, "expected \\(examples, 3072\\)"),
    (_label_count_mismatch, "to match b'data'"),
])
def test_cifar10_corrupt_batch_is_a_data_error_naming_the_file(
    tmp_path, name, corrupt, detail):
  write_cifar_batches(tmp_path)
  corrupt(tmp_path / name)
  with pytest.raises(DataError, match=detail) as raised:
    load_dataset(data_config(name="cifar10", dir=str(tmp_path)), seed=0)
  message = str(raised.value)
  assert str(tmp_path / name) in message
  assert "cifar-10-python.tar.gz" in message  # says what to do
  assert "\n" not in message


def test_unknown_dataset_is_a_config_error():
  with pytest.raises(ConfigError, match=r"data.name: unknown dataset 'mnist'; "
                     r"set --config.data.name to one of cifar10, digits, "
                     r"digits32, mnist1d, shakespeare$"):
    load_dataset(data_config(name="mnist"), seed=0)
  with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
    dataset_spec(data_config(name="mnist"))


@pytest.mark.parametrize("name,shape", [
    ("digits", (8, 8, 1)), ("digits32", (32, 32, 3)), ("cifar10", (32, 32, 3)),
    ("mnist1d", (40, 1))])
def test_every_dataset_declares_its_spec_without_reading_data(name, shape):
  """A cifar10 directory that does not exist is not read to learn its shape."""
  spec = dataset_spec(data_config(name=name, dir="gs://nowhere/cifar"))
  assert (spec.name, spec.input_shape, spec.num_classes, spec.dtype) == (
      name, shape, 10, "float32")
  assert name in dataset_names()


@pytest.mark.parametrize("name", ["digits", "digits32", "cifar10"])
def test_a_loaded_dataset_is_what_it_declared(name, tmp_path):
  write_cifar_batches(tmp_path)
  config = data_config(name=name, dir=str(tmp_path), val_fraction=0.25)
  assert load_dataset(config, seed=0).spec == dataset_spec(config)


def test_a_checkpoint_refuses_a_dataset_its_model_cannot_take_unread():
  metadata = {"config": config_lib.base_config().to_dict(),
              "model": {"name": "resnet",
                        "args": {"input_shape": [8, 8, 1], "num_classes": 10}}}
  with pytest.raises(ConfigError, match=r"mnist1d gives \(40, 1\) inputs with "
                     r"10 classes, but the checkpoint's model takes \(8, 8, "
                     r"1\)"):
    checkpoint_dataset(metadata, {"name": "mnist1d"})
  with pytest.raises(ConfigError, match="cifar10 gives"):  # dir never read
    checkpoint_dataset(metadata, {"name": "cifar10", "dir": "/nonexistent"})

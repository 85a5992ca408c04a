"""Preprocessed splits: written once as a TFDS array_record dataset, read as fixed-shape grain batches.

TFDS writes into an ``incomplete.*`` folder and renames it when the split is complete, so an
interrupted write never reads as a cache. TensorFlow is not needed: TFDS encodes the features
itself and ``as_data_source`` reads array_record files with random access.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from anomax.data.dataset import DLDataset, Sample
from anomax.data.images import read_pair
from anomax.errors import ConfigError, DatasetError
from anomax.preprocess.params import PreprocessParams, preprocess_image, preprocess_mask

CACHE_LAYOUT_VERSION = 1  # bump when the stored features change, so old caches are not reused
READ_THREADS = max(1, min(8, os.cpu_count() or 1))


class PreprocessedSplit(tfds.core.GeneratorBasedBuilder):
    """One preprocessed split of a dataset, stored as the TFDS split 'data'."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, records: grain.MapDataset, params: PreprocessParams, data_dir: str | Path):
        self._records = records
        self._params = params
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        p = self._params
        raw = tfds.features.Encoding.BYTES  # one blob per array; the default writes a proto entry per value (slow)
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(
                    shape=(p.height, p.width, p.num_channels), dtype=np.float32, encoding=raw
                ),
                "mask": tfds.features.Tensor(shape=(p.height, p.width), dtype=np.uint8, encoding=raw),
                "label": tfds.features.Scalar(dtype=np.int32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }
        )
        # disable_shuffling keeps the records in dataset order, so record i is sample i
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"data": self._generate_examples()}

    def _generate_examples(self):
        for record in self._records.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS)):
            yield int(record["index"]), record


def cache_path(dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path) -> Path:
    """The folder of the cache of this split's samples (files, sizes, mtimes) and these params."""
    return Path(cache_dir) / f"{split or 'all'}-{_cache_key(dataset.samples_of(split), params)}"


def is_cached(dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path) -> bool:
    """Whether a complete cache exists (a partly written one lives in an ``incomplete.*`` folder)."""
    return _builder(dataset, split, params, cache_dir).is_prepared()


def prepare_cache(dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path) -> Path:
    """Write the preprocessed split unless a complete cache for the same samples and params exists."""
    return Path(_prepared_builder(dataset, split, params, cache_dir).data_dir)


def num_batches(dataset: DLDataset, split: str | None, batch_size: int) -> int:
    return math.ceil(len(dataset.samples_of(split)) / batch_size)


def iterate_batches(
    dataset: DLDataset,
    split: str | None,
    params: PreprocessParams,
    batch_size: int,
    *,
    cache_dir: str | Path | None = None,
    shuffle: bool = False,
    seed: int = 0,
    progress: str | None = None,
) -> Batches:
    """Fixed-shape numpy batches of a split: 'image' float32 (B, H, W, C), 'mask' uint8 (B, H, W),
    'label' int32 (B,) 0 ok / 1 nok, 'valid' bool (B,) False on the padding of the last batch,
    'index' int32 (B,) position in ``dataset.samples_of(split)``.

    With ``cache_dir`` the split is preprocessed once into a TFDS array_record cache and read from
    there; with ``None`` it is preprocessed on the fly through the same grain pipeline.
    ``progress`` is a label for a tqdm bar over the batches (None: no bar). ``len()`` gives the
    number of batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if cache_dir is None:
        records = _preprocessed_records(dataset.samples_of(split), params)
    else:
        source = _prepared_builder(dataset, split, params, cache_dir).as_data_source(split="data")
        records = grain.MapDataset.source(source)
    return Batches(records, batch_size, shuffle, seed, progress)


class Batches:
    """An iterable of padded batches that knows its length (for progress bars)."""

    def __init__(self, records: grain.MapDataset, batch_size: int, shuffle: bool, seed: int, progress: str | None):
        n = len(records)
        order = grain.MapDataset.range(n).shuffle(seed=seed) if shuffle else grain.MapDataset.range(n)

        def padded(position: int) -> dict:
            # positions past the end repeat the last record, marked invalid, so every batch has the same shape
            record = records[order[min(position, n - 1)]]
            return {  # TFDS gives its integer scalars back as int64; fix every dtype here
                "image": record["image"].astype(np.float32, copy=False),
                "mask": record["mask"].astype(np.uint8, copy=False),
                "label": np.int32(record["label"]),
                "index": np.int32(record["index"]),
                "valid": np.bool_(position < n),
            }

        self._batches = grain.MapDataset.range(math.ceil(n / batch_size) * batch_size).map(padded).batch(batch_size)
        self._progress = progress

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict]:
        batches = self._batches.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
        if self._progress is None:
            return iter(batches)
        from tqdm.auto import tqdm

        return iter(tqdm(batches, desc=self._progress, total=len(self), unit="batch"))


def _preprocessed_records(samples: list[Sample], params: PreprocessParams) -> grain.MapDataset:
    def preprocess(index: int, sample: Sample) -> dict:
        image, mask = read_pair(sample.image_file_name, sample.anomaly_file_name)
        return {
            "image": preprocess_image(params, image),
            "mask": preprocess_mask(params, mask),
            "label": np.int32(sample.anomaly_label == "nok"),
            "index": np.int32(index),
        }

    return grain.MapDataset.source(samples).map_with_index(preprocess)


def _builder(
    dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path
) -> PreprocessedSplit:
    samples = dataset.samples_of(split)
    return PreprocessedSplit(
        records=_preprocessed_records(samples, params),
        params=params,
        data_dir=cache_path(dataset, split, params, cache_dir),
    )


def _prepared_builder(dataset, split, params, cache_dir) -> PreprocessedSplit:
    builder = _builder(dataset, split, params, cache_dir)
    if not builder.is_prepared():
        tfds.display_progress_bar(False)  # iterate_batches shows its own progress
        builder.download_and_prepare()
    return builder


def _cache_key(samples: list[Sample], params: PreprocessParams) -> str:
    """Hash of the params and of every file's name, size and mtime, so an edited file makes a new cache."""

    def stamp(path: str | None) -> list | None:
        if path is None:
            return None
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DatasetError(f"cannot read file {path} ({error.strerror}); check the dataset paths") from None
        return [path, stat.st_size, stat.st_mtime_ns]

    content = {
        "layout": CACHE_LAYOUT_VERSION,
        "params": params.to_dict(),
        "samples": [[s.anomaly_label, stamp(s.image_file_name), stamp(s.anomaly_file_name)] for s in samples],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]

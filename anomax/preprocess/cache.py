"""Preprocessed splits: written once as a TFDS array_record dataset, read as fixed-shape grain batches.

A cache is keyed on the params and on the content (SHA-256) of every image and mask, so an
edited file makes a new cache whatever its size and times, and a moved dataset keeps its cache.
TFDS writes into an ``incomplete.*`` folder and renames it when the split is complete, so an
interrupted write never reads as a cache; one process builds a cache at a time (a file lock), and
the ``incomplete.*`` folders a killed build left behind are removed. TensorFlow is not needed:
TFDS encodes the features itself and ``as_data_source`` reads array_record files with random
access. TFDS's console notes go to the ``anomax`` log at DEBUG.

The samples are stored as TFDS splits ``part0``, ``part1``, ... of at most half TFDS's in-memory
write buffer each, read back as one: TFDS holds a split in memory until it is written and spills a
larger one to temporary files through TensorFlow, which anomax does not install.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format
from tensorflow_datasets.core import shuffle as tfds_shuffle

from anomax import __version__
from anomax._global_state import root_logger_kept
from anomax.data.dataset import DLDataset, Sample
from anomax.data.images import log_conversions, read_pair
from anomax.errors import AnomaxError, ConfigError, DatasetError, OutputError
from anomax.files import locked, sha256_file
from anomax.preprocess.params import PreprocessParams, preprocess_image, preprocess_mask

with root_logger_kept:  # absl logs through the root logger
    import grain  # noqa: E402 - its import logs through absl


# bump when the stored records, or how images and masks are read and preprocessed, change, so old
# caches are not reused (4: palette and alpha masks read by colour, float images refused)
CACHE_LAYOUT_VERSION = 4
READ_THREADS = max(1, min(8, os.cpu_count() or 1))
INCOMPLETE_PREFIX = "incomplete."  # TFDS's name for a folder it is still writing

log = logging.getLogger("anomax")


class PreprocessedSplit(tfds.core.GeneratorBasedBuilder):
    """One preprocessed split of a dataset, stored as the TFDS split 'data'."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, records: grain.MapDataset, params: PreprocessParams, data_dir: str | Path,
                 progress: str | None = None):
        self._records = records
        self._params = params
        self.progress = progress
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
        return _LocalInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        from tqdm.auto import tqdm

        # TFDS's own bars are off (they print "Downloading and preparing"); this one says what happens.
        bar = tqdm(desc=self.progress, unit="image", total=len(self._records), disable=self.progress is None)
        per_part = _records_per_part(self._params)
        starts = range(0, len(self._records), per_part)
        return {f"part{i}": self._generate_examples(self._records[start:start + per_part], bar)
                for i, start in enumerate(starts)}

    def as_one_source(self):
        """All the stored parts as one random-access source, in sample order."""
        parts = sorted(self.info.splits, key=lambda name: int(name.removeprefix("part")))
        return self.as_data_source(split="+".join(parts))

    def _generate_examples(self, records: grain.MapDataset, bar):
        for record in records.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS)):
            bar.update()
            yield int(record["index"]), record
        if bar.n == bar.total:
            bar.close()

    # TFDS prints these two notes to stdout; they are no business of the user's console
    def _log_download_bytes(self) -> None:
        log.debug("tfds: Downloading and preparing dataset to %s", self.data_dir)

    def _log_download_done(self) -> None:
        log.debug("tfds: dataset prepared in %s", self.data_dir)


class _LocalInfo(tfds.core.DatasetInfo):
    """The info of a split written here: never looked up on TFDS's public bucket.

    TFDS's lookup makes a temporary folder for every builder of a folder not yet written and never
    removes it (one empty ``/tmp/tmp*tfds`` per cache check, before it finds GCS unreachable).
    """

    def initialize_from_bucket(self) -> None:
        pass


def _records_per_part(params: PreprocessParams) -> int:
    """How many samples one stored split holds: at most half of TFDS's in-memory write buffer."""
    record_bytes = params.height * params.width * (4 * params.num_channels + 1)  # float32 image + uint8 mask
    buffer_bytes = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    if record_bytes > buffer_bytes // 2:
        raise ConfigError(
            f"preprocess {params.width} x {params.height} x {params.num_channels} makes "
            f"{record_bytes / 2**20:.0f} MiB per image, more than the cache can write in one piece "
            f"({buffer_bytes // 2 / 2**20:.0f} MiB); use a smaller preprocess size or tiling"
        )
    return buffer_bytes // 2 // record_bytes


def cache_path(dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path) -> Path:
    """The folder of the cache of this split's samples (labels, file contents) and these params."""
    return Path(cache_dir) / f"{split or 'all'}-{_cache_key(dataset.samples_of(split), params)}"


def is_cached(dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path) -> bool:
    """Whether a complete cache exists (a partly written one lives in an ``incomplete.*`` folder)."""
    with _tfds_notes_to_debug():
        return _builder(dataset, split, params, cache_dir).is_prepared()


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
    source = f"the {split or 'whole'} split of {dataset.image_dir}"
    if cache_dir is None:
        records = _preprocessed_records(dataset.samples_of(split), params)
        return Batches(records, batch_size, shuffle, seed, progress, source)
    folder = cache_path(dataset, split, params, cache_dir)
    builder = _prepared_builder(dataset, split, params, cache_dir, folder, source, show_progress=progress is not None)
    with _reading_cache(folder):
        records = grain.MapDataset.source(builder.as_one_source())
    return Batches(records, batch_size, shuffle, seed, progress, source, cache=folder)


@contextlib.contextmanager
def _reading_cache(folder: Path) -> Iterator[None]:
    """What array_record, TFDS and protobuf raise on a damaged cache file (they share no type) becomes a
    DatasetError naming the folder; anomax's own errors pass."""
    try:
        yield
    except AnomaxError:
        raise
    except (RuntimeError, ValueError, OSError, json_format.ParseError) as error:
        raise DatasetError(f"the preprocessed cache {folder} is damaged or unreadable ({type(error).__name__}: "
                           f"{_first_line(error)}); delete that folder to rebuild it") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


class Batches:
    """An iterable of padded batches that knows its length (for progress bars)."""

    def __init__(self, records: grain.MapDataset, batch_size: int, shuffle: bool, seed: int, progress: str | None,
                 source: str = "the images", cache: Path | None = None):
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
        self._source = source
        self._cache = cache  # the cache folder the records are read from, named when one is damaged

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict]:
        batches = self._batches.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
        if self._progress is not None:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=self._progress, total=len(self), unit="batch")
        with contextlib.nullcontext() if self._cache is None else _reading_cache(self._cache):
            yield from batches
        log_conversions(f"reading {self._source}")  # read on the fly: conversions are noted per pass


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
    dataset: DLDataset, split: str | None, params: PreprocessParams, cache_dir: str | Path, folder: Path | None = None,
    show_progress: bool = False,
) -> PreprocessedSplit:
    samples = dataset.samples_of(split)
    return PreprocessedSplit(
        records=_preprocessed_records(samples, params),
        params=params,
        data_dir=folder or cache_path(dataset, split, params, cache_dir),
        progress=f"cache {split or 'all'}" if show_progress else None,
    )


def _prepared_builder(dataset, split, params, cache_dir, folder: Path, source: str,
                      show_progress: bool = False) -> PreprocessedSplit:
    with _tfds_notes_to_debug():  # e.g. TFDS warns that the folder it is about to write has no dataset_info.json
        with _reading_cache(folder):  # TFDS reads a prepared folder's dataset_info.json here
            builder = _builder(dataset, split, params, cache_dir, folder)
            prepared = builder.is_prepared()
        if prepared:
            return builder
        with _writing_cache(folder):
            _remove_stale_incomplete(Path(cache_dir))
            with _locked(folder):
                builder = _builder(dataset, split, params, cache_dir, folder, show_progress)  # another process may have built it
                if not builder.is_prepared():
                    _remove_incomplete(folder)  # this process holds the lock: whatever is incomplete here is stale
                    tfds.display_progress_bar(False)  # iterate_batches shows its own progress
                    builder.download_and_prepare()
                    log_conversions(f"caching {source}")
                    builder = _builder(dataset, split, params, cache_dir, folder)
        return builder


@contextlib.contextmanager
def _writing_cache(folder: Path) -> Iterator[None]:
    """A cache folder that cannot be written (read-only, a full disk, a file in the way) is an OutputError
    naming it: TFDS reports a full disk as a RuntimeError."""
    advice = "check free disk space and permissions, or set cache_dir=null to preprocess on the fly"
    try:
        yield
    except OSError as error:
        raise OutputError(f"cannot write the preprocessed cache {folder}: {error.strerror or error}; {advice}") from None
    except RuntimeError as error:
        if "No space left" not in str(error) and "write" not in str(error).lower():
            raise
        raise OutputError(f"cannot write the preprocessed cache {folder}: {_first_line(error)}; {advice}") from None


@contextlib.contextmanager
def _locked(folder: Path, wait: bool = True) -> Iterator[None]:
    """Hold the build lock of one cache folder; with ``wait=False`` raise BlockingIOError when it is held
    (anomax.files.locked: on a file system without locks, e.g. Lustre, the build runs with a warning)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").touch(exist_ok=True)
    with locked(folder / ".lock", wait=wait):  # the lock goes with the descriptor when the process dies
        yield


def _remove_incomplete(folder: Path) -> int:
    stale = list(folder.glob(f"*/{INCOMPLETE_PREFIX}*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def _remove_stale_incomplete(cache_dir: Path) -> None:
    """Remove the ``incomplete.*`` folders that killed builds left, but not those being written now."""
    removed = 0
    for folder in sorted({path.parents[1] for path in cache_dir.glob(f"*/*/{INCOMPLETE_PREFIX}*")}):
        try:
            with _locked(folder, wait=False):
                removed += _remove_incomplete(folder)
        except BlockingIOError:
            continue  # another process is building that cache
    if removed:
        log.info("removed %d incomplete cache folder%s that interrupted runs left in %s", removed,
                 "s" * (removed != 1), cache_dir)


class _ToDebug(logging.Filter):
    """Passes a TFDS (absl) log record on to the ``anomax`` log at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("tfds: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _tfds_notes_to_debug() -> Iterator[None]:
    absl, demote = logging.getLogger("absl"), _ToDebug()
    absl.addFilter(demote)
    try:
        with root_logger_kept:
            yield
    finally:
        absl.removeFilter(demote)


def _cache_key(samples: list[Sample], params: PreprocessParams) -> str:
    """Hash of the params and of every sample's label and file contents, in order."""
    files = [path for s in samples for path in (s.image_file_name, s.anomaly_file_name) if path is not None]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # hashlib releases the GIL on large blocks
        digests = dict(zip(files, pool.map(_content_hash, files)))
    content = {
        "layout": CACHE_LAYOUT_VERSION,
        "anomax": __version__,  # a release's reading and preprocessing fixes reach caches built before it
        "params": params.to_dict(),
        "samples": [[s.anomaly_label, digests[s.image_file_name], digests.get(s.anomaly_file_name)] for s in samples],
    }
    if isinstance(params.domain, str):  # the params name the domain mask's file: its content counts
        content["domain_mask"] = _content_hash(params.domain)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def _content_hash(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError as error:
        raise DatasetError(f"cannot read file {path} ({error.strerror}); check the dataset paths") from None

"""Image datasets -> validated examples: a MedMNIST-style .npz, a folder per class, or a table of image paths.

Layouts (of data.train; data.validation and data.test are read the same way, or carved from train):
- `.npz` with `train_images` + `train_labels` (and `val_*`, `test_*`, whose splits are used as given): uint8
  (N, H, W) grey or (N, H, W, 3) colour, labels (N,) or (N, 1) integers, or (N, L) 0/1 rows for several labels per
  image, named by image.class_names (else "0", "1", ...).
- a folder with one subfolder per class: the subfolder's name is the label; images anywhere below it.
- a CSV / TSV / JSONL / Parquet table with an image-path column (data.image_column, else image / path / file /
  filename / ...; relative paths are relative to the table's folder) and a label column (lists, or strings split on
  data.label_delimiter, for several labels per image; data/image_labels.py).
Files are decoded and resized when read (data/image_files.py); `task=auto` recognises all three (`is_image_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from strop.data.examples import LABEL_COLUMNS, Columns
from strop.data.image_files import IMAGE_SUFFIXES, ImageReader, as_array, fit, is_image_file, stack_images
from strop.data.image_labels import class_names, is_multi_label, label_ids, label_matrix
from strop.data.load import FORMATS, Table, read_table
from strop.data.prepare import Dataset
from strop.errors import DataError

PATH_COLUMNS = ["image", "image_path", "path", "file", "filename", "file_name", "img", "filepath"]
NPZ_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
FOLDER_COLUMNS = ["path", "label"]  # what predictions of a folder keep as input columns
NPZ_COLUMNS = ["split", "index", "label"]


@dataclass
class ImageExamples:
    """Decoded images of one split, each resized to image.size.

    pixels: (n, size, size, channels) uint8, channels 1 (grey) or 3 (RGB); labels: (n,) int64 class ids ((n, L)
    0/1 float32 for several labels per image), or None for unlabelled prediction input; sources: where each image came from (a path, or 'data.npz:test[12]')."""

    pixels: np.ndarray
    labels: np.ndarray | None
    sources: list[str]
    rows: list[int]  # each image's row among the input's rows (kept columns of predictions)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def texts(self) -> list[str]:
        """The sources, where a report lists examples by their text."""
        return self.sources

    def subset(self, idx) -> "ImageExamples":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageExamples(self.pixels[idx], None if self.labels is None else self.labels[idx],
                             [self.sources[i] for i in idx], [self.rows[i] for i in idx])


@dataclass
class RawSplit:
    """A split before decoding: one item per image (a file Path or an array), with its label as read."""

    where: str  # the file or folder, for messages
    items: list
    labels: list | None  # raw label values: folder names, table values, npz integers
    columns: list[str]  # input columns, kept beside predictions
    rows: list[dict]
    places: list[str] = field(default_factory=list)  # per item: where it was named ('train.csv:14'), for messages
    image_column: str | None = None  # a table's columns of paths and labels (None for .npz and folders)
    label_column: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# recognising the layouts


def npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}); write it with numpy.savez") from None


def has_class_folders(path: Path) -> bool:
    """Whether a folder holds subfolders with images in them (the first few are looked at)."""
    subfolders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")][:8]
    return any(is_image_file(f) for sub in subfolders for f in _first_files(sub, 50))


def _first_files(folder: Path, n: int) -> list[Path]:
    out = []
    for f in folder.rglob("*"):
        if f.is_file():
            out.append(f)
            if len(out) >= n:
                break
    return out


def path_column(table: Table, configured: str | None, strict: bool = True) -> str | None:
    """The column of image paths: the configured one, or the first candidate name whose values end in an image
    suffix. strict=False: a configured name the table lacks (the training table's, at prediction) is inferred."""
    if configured and (strict or configured in table.columns):
        if configured not in table.columns:
            raise DataError(f"data.image_column={configured!r} not found in {table.path}; columns are {table.columns}")
        return configured
    lower = {c.lower(): c for c in table.columns}
    for name in PATH_COLUMNS:
        column = lower.get(name)
        values = [r.get(column) for r in table.rows[:20]] if column else []
        if values and all(isinstance(v, str) and is_image_file(Path(v.strip())) for v in values):
            return column
    return None


def is_image_data(d) -> bool:
    """Whether data config `d`'s training data is an image layout (task=auto)."""
    if not d.train or not Path(d.train).exists():
        return False
    path = Path(d.train)
    if path.is_dir():
        return has_class_folders(path)
    if path.suffix.lower() == ".npz":
        return True
    if path.suffix.lower() not in FORMATS:
        return False
    try:
        table = read_table(path, d.format, d.encoding)
    except DataError:
        return False  # the task that reads it says what is wrong
    return isinstance(table, Table) and path_column(table, d.image_column) is not None


# ---------------------------------------------------------------------------------------------------------------
# reading each layout


def read_npz(path: Path) -> dict[str, RawSplit]:
    """{split: RawSplit} of a MedMNIST-style .npz; bad keys, shapes and lengths are DataErrors naming the file."""
    keys = npz_keys(path)
    found = {NPZ_SPLITS[k[:-len("_images")]]: k[:-len("_images")] for k in keys
             if k.endswith("_images") and k[:-len("_images")] in NPZ_SPLITS}
    if "train" not in found and "images" in keys:
        found = {"train": ""}  # one split: `images` + `labels`
    if not found:
        raise DataError(f"{path}: no image arrays found; expected train_images and train_labels (and val_* / test_*)"
                        f", or images and labels, but the file holds {keys}")
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for split, prefix in found.items():
            name = f"{prefix}_" if prefix else ""
            try:
                out[split] = _npz_split(path, z, name, split, keys)
            except (OSError, ValueError) as e:  # object arrays (pickles, refused) or a damaged file
                raise DataError(f"{path}: cannot read the {split} arrays ({e}); save plain numeric arrays with "
                                "numpy.savez") from None
    return out


def _npz_split(path: Path, z, name: str, split: str, keys: list[str]) -> RawSplit:
    images_key, labels_key = f"{name}images", f"{name}labels"
    images = z[images_key]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{path}: {images_key} has shape {images.shape}; expected (N, H, W) grey or (N, H, W, 3) "
                        "colour images")
    labels = None
    if labels_key in keys:
        labels = z[labels_key]
        if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] > 1 and not np.isin(labels, (0, 1)).all()):
            raise DataError(f"{path}: {labels_key} has shape {labels.shape}; give (N,) or (N, 1) class numbers, "
                            "or (N, L) rows of 0 / 1 for several labels per image")
        multi = labels.ndim == 2 and labels.shape[1] > 1  # (N, L) 0/1 rows: several labels per image
        labels = labels.reshape(len(labels), -1)[:, 0] if labels.ndim and not multi else labels
        if len(labels) != len(images):
            raise DataError(f"{path}: {images_key} holds {len(images)} images but {labels_key} {len(labels)} "
                            "labels; give one label per image")
        if labels.dtype.kind not in "iub":
            raise DataError(f"{path}: {labels_key} holds {labels.dtype} values; labels must be class numbers "
                            "(integers from 0), named by image.class_names")
    raw_labels = None if labels is None else [v.astype(np.int64) if v.ndim else int(v) for v in labels]
    rows = [{"split": split, "index": i, **({"label": label_cell(raw_labels[i])} if raw_labels else {})}
            for i in range(len(images))]
    return RawSplit(str(path), list(images), raw_labels, NPZ_COLUMNS if labels is not None else NPZ_COLUMNS[:2],
                    rows, [f"{path}:{split}[{i}]" for i in range(len(images))])


def label_cell(value) -> int | str:
    """An .npz label as a predictions file shows it: the class number, or the 0/1 row as '0|1|0'."""
    return "|".join(str(int(v)) for v in value) if isinstance(value, np.ndarray) else value


def read_folder(path: Path, labelled: bool = True) -> RawSplit:
    """Images of a folder: one subfolder per class (labelled); or, for unlabelled input, images anywhere in it."""
    classes = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    files, labels = [], []
    for folder in classes:
        found = sorted(f for f in folder.rglob("*") if f.is_file() and is_image_file(f))
        files += found
        labels += [folder.name] * len(found)
    if not files and not labelled:
        files = sorted(f for f in path.rglob("*") if f.is_file() and is_image_file(f))
        labels = None
    if not files:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in class subfolders; "
                        "put each class's images in a subfolder named after it (path/<class>/image.png)")
    rel = [str(f.relative_to(path)) for f in files]
    columns = FOLDER_COLUMNS if labels is not None else FOLDER_COLUMNS[:1]
    rows = [{"path": r, **({"label": lab} if labels is not None else {})} for r, lab in zip(rel, labels or rel)]
    return RawSplit(str(path), files, labels, columns, rows, [str(f) for f in files])


def read_image_table(path: Path, d, need_label: bool = True) -> RawSplit:
    """Images named by a table's path column (relative to the table's folder), labels from its label column."""
    table = read_table(path, d.format, d.encoding)
    if isinstance(table, dict):
        raise DataError(f"{path} holds several splits {sorted(table)}; point to one file per split")
    if not table.rows:
        raise DataError(f"{path} has a header but no rows; add images")
    strict = getattr(d, "strict_columns", True)
    column = path_column(table, d.image_column, strict)
    if column is None:
        raise DataError(f"{path}: no column of image paths found among {table.columns}; name it 'image' or 'path', "
                        "or set data.image_column")
    label = _label_column(table, d.label_column, column, need_label, strict)
    items, labels = [], [] if label else None
    for i, row in enumerate(table.rows):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{table.where(i)}: empty image path in column {column!r}; fill it in or remove the row")
        file = Path(value.strip()).expanduser()
        items.append(file if file.is_absolute() else path.parent / file)
        if labels is not None:
            labels.append(row.get(label))
    return RawSplit(str(path), items, labels, table.columns, table.rows, [table.where(i) for i in range(len(table))],
                    column, label)


def _label_column(table: Table, configured: str | None, path_col: str, need_label: bool,
                  strict: bool = True) -> str | None:
    if configured and (strict or configured in table.columns):
        if configured not in table.columns:
            if need_label:
                raise DataError(f"data.label_column={configured!r} not found in {table.path}; columns are "
                                f"{table.columns}")
            return None
        return configured
    lower = {c.lower(): c for c in table.columns if c != path_col}
    found = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
    if found is None and len(lower) == 1 and need_label:  # path + one column: that one holds the labels
        found = next(iter(lower.values()))
    if found is None and need_label:
        raise DataError(f"{table.path}: no label column found among {table.columns}; name it 'label' or set "
                        "data.label_column")
    return found


def read_raw(path: str | Path, d, need_label: bool = True) -> dict[str, RawSplit]:
    """{split: RawSplit} of any layout: an .npz may hold several splits, a folder or table holds one ('train')."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file or folder {path} not found; check the path (data.train/validation/test, or "
                        "--data)")
    if path.is_dir():
        return {"train": read_folder(path, labelled=need_label)}
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    return {"train": read_image_table(path, d, need_label)}


# ---------------------------------------------------------------------------------------------------------------
# labels and decoding


def decode_split(raw: RawSplit, reader: ImageReader, channels: int | None, labels: np.ndarray | None
                 ) -> ImageExamples:
    """Decode and resize a split's images (files through `reader`, arrays directly); skipped files drop out with
    their labels. channels None: 3 if any image is colour."""
    fitted, keep = [], []
    for i, (item, place) in enumerate(zip(raw.items, raw.places)):
        a = fit(as_array(item), reader.size) if isinstance(item, np.ndarray) else reader.read(Path(item), place)
        if a is not None:
            fitted.append(a)
            keep.append(i)
    if not fitted:
        raise DataError(f"{raw.where}: none of its {len(raw.items)} images could be read; check the files")
    sources = [str(raw.items[i]) if not isinstance(raw.items[i], np.ndarray) else raw.places[i] for i in keep]
    return ImageExamples(stack_images(fitted, channels), None if labels is None else labels[keep], sources, keep)


# ---------------------------------------------------------------------------------------------------------------
# the dataset


def prepare_images(cfg, task_name: str, multi_task: str, carve: bool = True) -> Dataset:
    """Read, decode, validate and split the image data cfg.data describes (image.size pixels square). The
    dataset's task is `task_name`, or `multi_task` when the training labels hold several labels per image and
    the task was left to the data (task=auto)."""
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set; give an .npz file, a folder of class folders or a table of image "
                        "paths, e.g. `strop train data.train=images/`")
    raws = read_raw(d.train, d)
    if "train" not in raws:
        raise DataError(f"{d.train} holds splits {sorted(raws)} but no train split")
    for split in ("validation", "test"):
        path = getattr(d, split)
        if path:
            given = read_raw(path, d)
            raws[split] = given.get(split) or given.get("train") or next(iter(given.values()))
    task = image_task(raws["train"], cfg, task_name, multi_task)
    names = class_names(raws["train"], list(cfg.image.class_names), d.label_delimiter)
    labels = {split: split_labels(raw, names, split, task == multi_task, d.label_delimiter)
              for split, raw in raws.items()}
    reader = ImageReader(cfg.image.size, d.on_bad_image)
    splits = {"train": decode_split(raws["train"], reader, None, labels["train"])}
    channels = splits["train"].pixels.shape[-1]  # the other splits follow training's grey or colour
    for split in ("validation", "test"):
        if split in raws:
            splits[split] = decode_split(raws[split], reader, channels, labels[split])
    kind = "labels, several per image" if task == multi_task else "classes"
    notes = [f"images: {len(names)} {kind}, {'colour' if channels == 3 else 'grey'}, resized to "
             f"{cfg.image.size}x{cfg.image.size} (image.size)"]
    if reader.note():
        notes.append(reader.note())
    train = raws["train"]
    ds = Dataset(task, names, Columns(train.image_column, None, train.label_column), splits, notes)
    if carve:
        ds.carve_missing(d)
    return ds


def image_task(train: RawSplit, cfg, task_name: str, multi_task: str) -> str:
    """The task the training labels call for; a task named in the config that they contradict is an error."""
    multi = is_multi_label(train, cfg.data.label_delimiter)
    if cfg.task == "auto":
        return multi_task if multi else task_name
    if multi != (cfg.task == multi_task):
        want = multi_task if multi else task_name
        raise DataError(f"task={cfg.task} but {train.where} has {'several labels' if multi else 'one class'} per "
                        f"image; set task={want} or task=auto")
    return cfg.task


def split_labels(raw: RawSplit, names: list[str], split: str, multi: bool, delimiter: str | None):
    """(n,) class ids, or (n, L) 0/1 rows for several labels per image; None for a split without labels."""
    if raw.labels is None:
        return None
    return label_matrix(raw, names, split, delimiter) if multi else label_ids(raw, names, split)


def read_prediction_input(path: str | Path, d, size: int, channels: int, names: list[str], need_label: bool,
                          on_bad: str = "error", multi: bool = False) -> tuple[RawSplit, ImageExamples]:
    """A file or folder to predict or evaluate on: (its raw split, for the input columns, and its images, with
    labels when present or needed). An .npz with several splits gives its test split (else val, else train)."""
    raws = read_raw(path, d, need_label)
    raw = raws.get("test") or raws.get("validation") or raws["train"]
    if need_label and raw.labels is None:
        raise DataError(f"{path} has no labels; evaluation needs a label per image (class subfolders, a label "
                        "column, or *_labels arrays)")
    labels = None
    if raw.labels is not None:
        try:
            labels = split_labels(raw, names, "input", multi, getattr(d, "label_delimiter", None))
        except DataError:
            if need_label:
                raise
            # predictions need no gold labels: subfolders named otherwise (new_scans/week1/) are only folders
    return raw, decode_split(raw, ImageReader(size, on_bad), channels, labels)

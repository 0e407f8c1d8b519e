"""Where models and datasets come from, offline: a local folder, or a hub id already in the local
Hugging Face cache (`from_pretrained(id, local_files_only=True)` semantics). Nothing is downloaded.

Datasets go through `datasets.load_dataset` (json / jsonl / parquet / csv / arrow files, a folder of
them, a hub snapshot folder with its split files and configs, a cached hub id), or
`datasets.load_from_disk` for a `save_to_disk` folder. A single JSONL file is read line by line by
fastpref itself so that a bad row is reported with its file and line.
"""

from __future__ import annotations

from pathlib import Path

# file suffix -> datasets' packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


def _cached_snapshot(repo_id: str, repo_type: str) -> Path | None:
    """The local snapshot folder of a hub repository in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def model_folder(name: str, presets: tuple[str, ...]) -> Path:
    """A local model folder, or the cached snapshot of hub id `name`; FileNotFoundError otherwise."""
    path = Path(name)
    if path.is_dir():
        return path
    snapshot = _cached_snapshot(name, "model") if _looks_like_repo_id(name) else None
    if snapshot is None:
        hint = f" (fetch it once with `hf download {name}`)" if _looks_like_repo_id(name) else ""
        raise FileNotFoundError(
            f"model {name!r} is neither a local transformers model directory, a hub id in the local Hugging Face "
            f"cache, nor a preset {list(presets)}; nothing is downloaded{hint}"
        )
    return snapshot


def _looks_like_repo_id(name: str) -> bool:
    """'org/name' or 'name': what the hub accepts, not a path."""
    path = Path(name)
    return not path.is_absolute() and not name.startswith(".") and name.count("/") <= 1 and not path.exists()


def _saved_to_disk(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in SAVED_MARKERS)


def load_splits(name: str, config_name: str | None, train_split: str, test_split: str, read_jsonl):
    """(train rows, test rows or None) from a file, a folder or a cached hub id (see the module doc).

    `read_jsonl(path)` reads a single JSONL file (fastpref's reader: errors name the file and line).
    """
    path = Path(name)
    if path.is_file() and path.suffix == ".jsonl" and config_name is None:
        rows = read_jsonl(path)
        if not rows:
            raise ValueError(f"dataset {name} holds no rows")
        return rows, None
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading dataset {name!r} needs the `datasets` package: pip install fastpref[train]") from e
    if path.is_file():
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset {name}: unknown file type {path.suffix!r}; give one of {sorted(BUILDERS)}")
        data = _load(datasets, name, builder, data_files={"train": str(path)})
    elif path.is_dir() and _saved_to_disk(path):
        data = datasets.load_from_disk(str(path))
    else:
        folder = path if path.is_dir() else _cached_snapshot(name, "dataset") if _looks_like_repo_id(name) else None
        if folder is None:
            raise FileNotFoundError(
                f"dataset {name!r} not found: give a file ({', '.join(sorted(BUILDERS))}), a folder of them, a "
                "save_to_disk folder, a hub id in the local Hugging Face cache (nothing is downloaded), or a packaged "
                "name"
            )
        data = _load(datasets, name, str(folder), name=config_name)
    if isinstance(data, datasets.DatasetDict):
        if train_split not in data:
            raise ValueError(
                f"dataset {name} has splits {sorted(data)}, not the training split {train_split!r} "
                "(--dataset_train_split)"
            )
        test = data[test_split].to_list() if test_split in data else None
        return data[train_split].to_list(), test
    return data.to_list(), None


def _load(datasets, source: str, *args, **kwargs):
    """datasets.load_dataset, offline, with its failures named by the dataset they come from."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise ValueError(f"dataset {source}: {e}") from None
    except Exception as e:  # arrow / builder errors on malformed files
        if type(e).__module__.split(".")[0] in ("datasets", "pyarrow"):
            raise ValueError(f"dataset {source}: {type(e).__name__}: {e}") from None
        raise

"""A Hugging Face hub dataset by name (``user/name``), or a local folder laid out as a hub dataset repository."""

from __future__ import annotations

import datasets

from fusion_errors import DataError

from . import Source, Splits, register_format


def _a_name(source: Source) -> bool:
    return source.name is not None and source.folder is None and not source.files


@register_format("hub", reads="name", sniff=_a_name, rank=1000, streams=True)
def read_hub(source: Source) -> Splits:
    """``datasets.load_dataset(name)``: a hub name (internet or the local datasets cache) or a dataset folder."""
    assert source.name is not None
    try:
        loaded = datasets.load_dataset(source.name, streaming=source.streaming)
    except Exception as e:  # hub errors come in many types; all mean "cannot load this name"
        raise DataError(
            f"cannot load dataset {source.name!r} ({type(e).__name__}: {e}). Give a Hugging Face hub name (needs "
            "internet or a local datasets cache), or local data with --data.data_files / --data.data_dir."
        ) from e
    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"dataset {source.name!r} loaded as {type(loaded).__name__}, not splits of rows; give a "
                        "dataset with train/validation/test splits.")
    return loaded

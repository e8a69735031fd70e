"""Datasets: loading, the RecBole sequential protocol, and input pipelines.

`load_dataset(name, root=None, **kwargs)` is the single entry point:

  ml-100k            MovieLens-100k (GroupLens raw or RecBole atomic files)
  ml-1m              MovieLens-1M (GroupLens .dat files)
  amazon-<category>  2014 Amazon 5-core reviews + metadata (beauty, sports,
                     toys, or a verbatim category file name)
  synthetic          generated data with planted structure (kwargs size it)
"""

from __future__ import annotations

import os

from taiji_jax.data.dataset import Dataset
from taiji_jax.data.parsing import DataError

DATASETS = ("ml-100k", "ml-1m", "amazon-<category>", "synthetic")


def load_dataset(name: str,
                 root: os.PathLike | str | None = None,
                 **kwargs) -> Dataset:
  """Loads a dataset by name; see the module docstring for the names.

  Args:
    name: dataset name.
    root: directory holding the raw files (skips cache and download).
    **kwargs: generator arguments (only for "synthetic").

  Raises:
    DataError: unknown name, or files that are missing or malformed.
  """
  # Imported lazily so that `import taiji_jax.data` stays cheap.
  # pylint: disable=g-import-not-at-top
  if kwargs and name != "synthetic":
    raise DataError(f"load_dataset({name!r}) takes no extra arguments, got "
                    f"{sorted(kwargs)}.")
  if name == "ml-100k":
    from taiji_jax.data import movielens
    return movielens.load_ml100k(root)
  if name == "ml-1m":
    from taiji_jax.data import movielens
    return movielens.load_ml1m(root)
  if name.startswith("amazon-") and len(name) > len("amazon-"):
    from taiji_jax.data import amazon
    return amazon.load_amazon(name[len("amazon-"):], root)
  if name == "synthetic":
    if root is not None:
      raise DataError("the synthetic dataset is generated; root must be None.")
    from taiji_jax.data import synthetic
    return synthetic.make_synthetic(**kwargs)
  raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}.")


__all__ = ["DataError", "Dataset", "DATASETS", "load_dataset"]

"""Datasets by name and the DataModule every method shares."""

from sslpipe.data.datamodule import SSLDataModule
from sslpipe.data.datasets import DATASETS, DatasetSpec, IndexedDataset, build_dataset, dataset_spec

__all__ = ["DATASETS", "DatasetSpec", "IndexedDataset", "SSLDataModule", "build_dataset", "dataset_spec"]

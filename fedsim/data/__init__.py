"""Datasets and partitioners: a scenario's ``[data]`` table becomes a :class:`Federation`.

Per-client shards are index arrays into one shared pool. Datasets live in
:data:`DATASETS` (synthetic, digits, mnist), partitioners in :data:`PARTITIONERS`
(iid, dirichlet, shards, quantity); both are selected in TOML by a discriminator key
(``dataset = "digits"``, ``[data.partition] kind = "dirichlet"``).
"""

from fedsim.data.digits import DigitsData
from fedsim.data.federation import DATASETS, Federation
from fedsim.data.generated import GeneratedData, GeneratedFederation
from fedsim.data.loading import (
    AnyFederation,
    DataSpec,
    clear_federation_cache,
    load_federation,
    partition_summary,
)
from fedsim.data.mnist import MnistData
from fedsim.data.partition import (
    PARTITIONERS,
    DirichletPartition,
    IidPartition,
    PartitionError,
    PartitionSpec,
    QuantityPartition,
    ShardsPartition,
)
from fedsim.data.synthetic import SyntheticData

__all__ = [
    "AnyFederation",
    "GeneratedData",
    "GeneratedFederation",
    "DATASETS",
    "PARTITIONERS",
    "DataSpec",
    "DigitsData",
    "DirichletPartition",
    "Federation",
    "IidPartition",
    "MnistData",
    "PartitionError",
    "PartitionSpec",
    "QuantityPartition",
    "ShardsPartition",
    "SyntheticData",
    "clear_federation_cache",
    "load_federation",
    "partition_summary",
]

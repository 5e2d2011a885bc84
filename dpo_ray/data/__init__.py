"""Preference data on Ray Data: every TRL dataset format, streamed and tokenized (docs/data.md).

The training code imports exactly these names.
"""

from dpo_ray.data.batching import (
    BatchIterator,
    EvalShare,
    iter_eval_batches,
    iter_train_batches,
    unwrap_data_error,
)
from dpo_ray.data.collate import collate_pairs, collate_sft
from dpo_ray.data.pipeline import PreparedData, build_datasets, ingest_config, tokenize_rows
from dpo_ray.data.rows import BAD_ROW_KINDS
from dpo_ray.data.stats import DataStats
from dpo_ray.data.tokenizers import load_processing_class, load_tokenizer
from dpo_ray.errors import BadRowError, DataError, DataSourceError, ModelFilesError, TooFewRowsError

__all__ = [
    "BAD_ROW_KINDS", "BadRowError", "BatchIterator", "EvalShare", "DataError", "DataSourceError", "DataStats",
    "ModelFilesError", "PreparedData", "TooFewRowsError",
    "build_datasets", "collate_pairs", "collate_sft", "ingest_config", "iter_eval_batches",
    "iter_train_batches", "load_processing_class", "load_tokenizer", "tokenize_rows",
    "unwrap_data_error",
]

"""Data: the CoLLM-schema loader with validation, a synthetic generator, prompts, batching."""

from llmrec.data.batching import (
    MODEL_KEYS,
    RecCollator,
    RecExamples,
    encode_prompts,
    make_examples,
    pad_id_of,
)
from llmrec.data.loader import SPLITS, RecData, load_data, read_split, write_data
from llmrec.data.prompts import (
    COLLM_TEMPLATE,
    CORA_TEMPLATE,
    ITEM_PLACEHOLDER,
    MAX_HIS,
    USER_PLACEHOLDER,
    build_prompt,
    build_prompts,
    format_title_list,
)
from llmrec.data.schema import REQUIRED_COLUMNS, DataValidationError, validate_split
from llmrec.data.synthetic import SyntheticFactors, make_synthetic

__all__ = [
    "COLLM_TEMPLATE",
    "CORA_TEMPLATE",
    "ITEM_PLACEHOLDER",
    "MAX_HIS",
    "MODEL_KEYS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "USER_PLACEHOLDER",
    "DataValidationError",
    "RecCollator",
    "RecData",
    "RecExamples",
    "SyntheticFactors",
    "build_prompt",
    "build_prompts",
    "encode_prompts",
    "format_title_list",
    "load_data",
    "load_run_data",
    "make_examples",
    "make_synthetic",
    "pad_id_of",
    "read_split",
    "validate_split",
    "write_data",
]


def load_run_data(data_path=None) -> RecData:
    """The dataset at ``data_path``, or the embedded synthetic dataset when it is None."""
    if data_path is None:
        return make_synthetic()
    return load_data(data_path)

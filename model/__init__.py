"""The CoAtNet family 0..7 (Dai et al., 2021) plus tiny variants for tests and the CPU demo."""
from .accounting import count_macs, count_params, param_groups
from .coatnet import CoAtNet, create_model
from .config import MODEL_SIZES, CoAtNetConfig, get_config, list_models
from .rel_pos import TABLE_SUFFIX, resize_rel_pos_tables

__all__ = [
    "CoAtNet", "CoAtNetConfig", "MODEL_SIZES", "TABLE_SUFFIX", "count_macs", "count_params", "create_model",
    "get_config", "list_models", "param_groups", "resize_rel_pos_tables",
]

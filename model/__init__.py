"""The CoAtNet family 0..7 (Dai et al., 2021) plus tiny variants for tests and the CPU demo."""
from .accounting import count_macs, count_params, param_groups, recompute_fraction, stage_fractions
from .attention import ATTENTION_IMPLS, set_attention_impl
from .coatnet import CoAtNet, channels_last_default, create_model, prepare_for_speed
from .config import MODEL_SIZES, CoAtNetConfig, get_config, list_models
from .init import build_initialised, init_weights
from .rel_pos import TABLE_SUFFIX, resize_rel_pos_tables

__all__ = [
    "CoAtNet", "CoAtNetConfig", "channels_last_default", "MODEL_SIZES", "TABLE_SUFFIX", "count_macs", "count_params", "create_model",
    "get_config", "list_models", "param_groups", "prepare_for_speed", "resize_rel_pos_tables", "set_attention_impl",
    "ATTENTION_IMPLS", "build_initialised", "init_weights", "recompute_fraction", "stage_fractions",
]

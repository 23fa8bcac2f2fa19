"""Checkpoint conversion between PyTorch (torch state dicts, safetensors) and Flax variable trees.

Quick start::

    from mergejax import convert
    variables, record = convert.torch_to_flax("path/to/model.safetensors", "bert")
    tensors = convert.flax_to_torch(variables, "bert", record=record)
    convert.write_sharded_safetensors("out_dir", tensors, max_shard_size="2GB")

torch is needed only for ``.bin``/``.pt``/``.pth`` files; safetensors files are read and written without it.
"""

from mergejax.convert.core import (
    ConversionError,
    ConversionRecord,
    ConversionReport,
    flax_to_state_dict,
    flax_to_torch,
    torch_to_flax,
    unflatten,
)
from mergejax.convert.io import (
    DictSource,
    LazyTensor,
    SafetensorsFile,
    ShardedCheckpoint,
    TensorInfo,
    TensorSource,
    TorchFile,
    numpy_to_torch,
    open_checkpoint,
    parse_size,
    torch_to_numpy,
    write_safetensors,
    write_sharded_safetensors,
    write_torch_state_dict,
)
from mergejax.convert.rules import (
    BERT,
    EFFICIENTNET_LITE0,
    GENERIC,
    DropRule,
    Layout,
    Rule,
    RuleSet,
    available_rules,
    bert_rules,
    get_rules,
    register_rules,
)

__all__ = [
    "BERT",
    "EFFICIENTNET_LITE0",
    "GENERIC",
    "ConversionError",
    "ConversionRecord",
    "ConversionReport",
    "DictSource",
    "DropRule",
    "LazyTensor",
    "Layout",
    "Rule",
    "RuleSet",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "TensorInfo",
    "TensorSource",
    "TorchFile",
    "available_rules",
    "bert_rules",
    "flax_to_state_dict",
    "flax_to_torch",
    "get_rules",
    "numpy_to_torch",
    "open_checkpoint",
    "parse_size",
    "register_rules",
    "torch_to_flax",
    "torch_to_numpy",
    "unflatten",
    "write_safetensors",
    "write_sharded_safetensors",
    "write_torch_state_dict",
]

"""A GGUF's quantised weights written out at a higher precision (F32, F16 or BF16), same metadata.

llama.cpp computes a quantised matrix product by quantising the activations too (Q4_1 weights
meet Q8_1 activations), so its answers drift from those of the de-quantised weights that
transformers loads and trains on; the same weights de-quantised into an F32 GGUF are computed in
f32 and agree with them (docs/benchmarks.md has both figures). Read with ``gguf.GGUFReader``,
de-quantised with ``gguf.quants``, written with ``gguf.GGUFWriter`` as the ``gguf`` package's own
gguf_new_metadata script copies a file: every key but the file type, then every tensor.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file and tensor count at INFO

# llama.cpp's general.file_type values (gguf.LlamaFileType) and numpy types per target precision.
PRECISIONS = ("f32", "f16", "bf16")


def dequantized_gguf(source: Path, target: Path, precision: str) -> Path:
    """Write ``source``'s tensors at ``precision`` into ``target`` (atomically; 1-D tensors stay F32)."""
    import gguf
    import numpy as np

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[precision]
    reader = gguf.GGUFReader(str(source))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staged = staging / target.name
    try:
        writer = gguf.GGUFWriter(str(staged), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by the writer itself
            if field.name == gguf.Keys.General.FILE_TYPE:
                writer.add_file_type(file_type)
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            if values.ndim == 1 or precision == "f32":
                writer.add_tensor(tensor.name, values)
            elif precision == "f16":
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:
                packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
                writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staged.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%s of %s)", target, precision, source.name)
    return target


def merged_gguf(base: Path, lora: Path, target: Path) -> Path:
    """``base`` with a llama.cpp LoRA GGUF folded into its weights (W + alpha/r * B A), same precision.

    What llama.cpp's llama-export-lora does, for a base of float tensors (an F16/F32 GGUF): the
    adapted model then decodes at the base model's speed, with no per-token LoRA products.
    """
    import gguf
    import numpy as np

    adapter = gguf.GGUFReader(str(lora))
    alpha = float(adapter.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
    parts = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in adapter.tensors}
    reader = gguf.GGUFReader(str(base))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staged = staging / target.name
    try:
        writer = gguf.GGUFWriter(str(staged), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            lora_a, lora_b = parts.get(f"{tensor.name}.lora_a"), parts.get(f"{tensor.name}.lora_b")
            if lora_a is None:
                writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
                continue
            if tensor.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                raise ValueError(f"{base}: {tensor.name} is {tensor.tensor_type.name}; merging needs an F16 or F32 base")
            weights = tensor.data.astype(np.float32) + (alpha / lora_a.shape[0]) * (lora_b @ lora_a)
            writer.add_tensor(tensor.name, weights.astype(tensor.data.dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staged.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

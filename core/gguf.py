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

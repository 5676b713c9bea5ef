"""Rewrite a quantised GGUF file with bf16 weights, so llama.cpp can be measured in bf16 on the same model.

Metadata (architecture, tokenizer, chat template) is copied as is; every
matrix is dequantised and stored as bf16, vectors as f32 (llama.cpp's own
bf16 conversion keeps norms in f32 too).
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

FILE_TYPE_BF16 = 32  # llama_ftype LLAMA_FTYPE_MOSTLY_BF16


def write_bf16_gguf(source: Path, destination: Path) -> Path:
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(destination), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        if name == "general.file_type":
            writer.add_key_value(name, FILE_TYPE_BF16, GGUFValueType.UINT32)
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim > 1:
            writer.add_tensor(tensor.name, quantize(values, GGMLQuantizationType.BF16), raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return destination

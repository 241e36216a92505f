"""Deploying a sparse model: compressed files (bitmask or CSR in safetensors, checked before they
load) and CSR inference where it is measured to be faster. Needs the ``export`` extra for files."""
from .bench import bench_inference, bench_inference_command
from .export import FORMAT_VERSION, SparseFile, SparseFileError, infer_model_spec, load_sparse, read_sparse, save_sparse
from .format import encoded_bytes, pack_bits, unpack_bits
from .inference import LayerDecision, measure, plan_inference, to_inference
from .modules import SparseLinear, SparseMultiheadAttention, is_2to4
from .size import SizeReport, SizeRow, build_model, export_command, size_report

__all__ = [
    "save_sparse", "load_sparse", "read_sparse", "SparseFile", "SparseFileError", "FORMAT_VERSION", "infer_model_spec",
    "encoded_bytes", "pack_bits", "unpack_bits", "size_report", "SizeReport", "SizeRow", "export_command",
    "build_model", "to_inference", "plan_inference", "LayerDecision", "measure", "SparseLinear",
    "SparseMultiheadAttention", "is_2to4", "bench_inference", "bench_inference_command",
]

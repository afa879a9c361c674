"""The NVFP4 checkpoint format as plain torch and JSON, apart from ModelOpt's quantizers.

NVFP4 codes, packing and two-level scales (:mod:`~quantdag.format.nvfp4`: E2M1 elements packed two
per ``uint8``, one float8_e4m3fn scale per block of 16 along the reduction dim, one float32
per-tensor scale), FP8 E4M3 per-tensor linears (:mod:`~quantdag.format.fp8`), FP8 KV-cache
emulation (:mod:`~quantdag.format.fp8_kv`), a read-only view of a
safetensors checkpoint and the layout of an export (:mod:`~quantdag.format.checkpoint`,
:mod:`~quantdag.format.layout`), and a runnable CPU model read back from an export
(:mod:`~quantdag.format.reader`). Layer 1 of the import order (see :mod:`quantdag`): it imports
nothing of the project but itself, so audits, evaluation and benchmarks read exports without the
pipeline.
"""

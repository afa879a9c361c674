"""Calibration around ModelOpt's ``mtq.quantize``: everything between a loaded base and a quantizer state.

The recipe (a :class:`conf.schema.RecipeSpec` as an ``mtq.quantize`` config, and the one
calibration a list of recipes shares), fast max calibration with ModelOpt's amax, recalibrating
one loaded model from a clean slate, a recipe's weight scales and local Hessians over a shared
calibration (``weight_scales``), pure-torch stand-ins for ModelOpt's CUDA/Triton NVFP4 kernels on
the CPU (``cpu_kernels``), the saved quantizer state that merge and export read, and report
plots; the quantization algorithm stays ModelOpt's. Layer 3 of the import order (see :mod:`quantdag`): it may import ``conf``,
:mod:`quantdag.format` and :mod:`quantdag.model`, not :mod:`quantdag.runtime`, ``tasks`` or
``flows``.
"""

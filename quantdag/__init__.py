"""The quantization library: what each pipeline step does, apart from the orchestration around it.

Sub-packages, lowest layer first: :mod:`quantdag.format` (the NVFP4 checkpoint format), then
:mod:`quantdag.model` (resolving and loading a base) and :mod:`quantdag.demo` (the offline demo
inputs), then :mod:`quantdag.calibration` (recipe, fast max calibration, quantizer state) and
:mod:`quantdag.evaluation` (the BF16 reference record and the metrics against it), then
:mod:`quantdag.runtime` (artifact store, locks, MLflow and Prefect plumbing). The project's import
order is ``conf`` < ``quantdag.format`` < ``quantdag.model``, ``quantdag.demo`` <
``quantdag.calibration``, ``quantdag.evaluation`` < ``quantdag.runtime`` < ``tasks`` < ``flows``: a module imports its own
package and lower layers only (packages of one layer not each other), so nothing here imports
``tasks`` or ``flows``. This ``__init__`` holds no code and imports nothing.
``tests/test_layering.py`` checks the order, function-level imports included, and that no modules
import each other in a cycle.
"""

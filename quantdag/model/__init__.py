"""The BF16 base model: its pinned identity, where it goes, and loading it once per process.

:mod:`~quantdag.model.loading` turns a :class:`conf.schema.BaseModelSpec` (Hub repo, local
directory or GGUF file) into a ``BaseRef`` (the base's identity, passed between tasks) and loads
its model, tokenizer or processor; :mod:`~quantdag.model.placement` plans one device or a spread
over GPUs, host RAM and disk; :mod:`~quantdag.model.warm` keeps one loaded model between the model
steps of a process. Layer 2 of the import order (see :mod:`quantdag`): it may import ``conf`` and
:mod:`quantdag.format`, not :mod:`quantdag.demo`, :mod:`quantdag.calibration`,
:mod:`quantdag.runtime`, ``tasks`` or ``flows``.
"""

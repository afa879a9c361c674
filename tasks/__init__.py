"""The pipeline's steps: one module per step, a plain function and a few-line Prefect ``@task`` wrapper.

A step (resolve, fetch, calibrate, merge, export, audit, evaluate, ...; the watcher's are in
:mod:`tasks.watch`) takes and returns references (``BaseRef``, ``ArtifactRef``), never a model or a
tensor. Layer 5 of the import order (see :mod:`quantdag`): a step may import ``conf``, every
``quantdag`` sub-package and other steps, never ``flows``; nothing in ``quantdag`` or ``conf``
imports a step.
"""

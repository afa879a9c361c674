"""What runs the pipeline rather than quantizes: storage, coordination, tracking and deployment.

The content-addressed artifact store (:mod:`~quantdag.runtime.store`), leased step locks and GPU
slots (:mod:`~quantdag.runtime.locks`), Prefect's task policy (:mod:`~quantdag.runtime.prefect_task`),
MLflow tracking and the quantize flow's records (:mod:`~quantdag.runtime.tracking`,
:mod:`~quantdag.runtime.lineage`, :mod:`~quantdag.runtime.registry`, :mod:`~quantdag.runtime.notes`),
run names (:mod:`~quantdag.runtime.naming`), run-graph edges (:mod:`~quantdag.runtime.graph`), a fresh
stack's buckets and UIs (:mod:`~quantdag.runtime.stack`), the reaper of abandoned runs, preflight checks, deployments,
secret redaction, the code version and progress reporting. Layer 4 of the import order (see
:mod:`quantdag`): it may import ``conf`` and the other ``quantdag`` sub-packages, never ``tasks``
or ``flows``.
"""

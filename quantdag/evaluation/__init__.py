"""How far an NVFP4 model is from its BF16 base: the reference record and the metrics against it.

:mod:`~quantdag.evaluation.logprobs` keeps what the comparison needs of the BF16 model's
next-token distributions (target log-probability, top-k ids and log-probabilities) and scores a
candidate model against it (perplexities, KL, top-1 agreement). Layer 3 of the import order (see
:mod:`quantdag`), beside :mod:`quantdag.calibration`: it may import ``conf``,
:mod:`quantdag.format` and :mod:`quantdag.model`, never ``quantdag.runtime``, ``tasks`` or ``flows``.
"""

"""The watcher's steps: find new commits of watched base models, then start one quantize run each.

:mod:`~tasks.watch.hub_scan` asks the Hub for the commit sha of every branch that ``conf/watch.yaml``
watches; :mod:`~tasks.watch.hub_watch` checks each candidate and starts the quantize deployment.
Part of ``tasks`` (layer 5 of the import order, see :mod:`quantdag`): it may import ``conf``,
``quantdag`` and other steps, never ``flows``.
"""

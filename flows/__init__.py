"""Entrypoints: the Prefect flows (quantize, watch base releases) and the ``quantdag`` command line.

A flow only wires the steps of ``tasks`` together; the CLI parses arguments and starts flows or
helpers. The top layer of the import order (see :mod:`quantdag`): an entrypoint may import every
other package, and nothing imports one but another entrypoint.
"""

"""lossd benchmark harness: ``python -m bench`` from the repository root.

The package is not installed with lossd (``pyproject.toml`` installs ``client/`` and
``server/`` only), so run it from a checkout. Modules:

- :mod:`bench.harness`: the interleaved run and its table (``python -m bench``);
- :mod:`bench.paths`: the timed paths (torch LS CE, autograd OLS, server math, remote steps);
- :mod:`bench.baseline`: the autograd OLS module written the usual way;
- :mod:`bench.server`: a ``lossd serve`` child process on TCP loopback;
- :mod:`bench.machine`: what the figures ran on;
- :mod:`bench.memory`: the server's RSS per session, over 10,000 requests, and the 32000-class refusal.
"""

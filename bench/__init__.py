"""lossd benchmark harness: ``python -m bench`` from the repository root.

The package is not installed with lossd (``pyproject.toml`` installs ``client/`` and
``server/`` only), so run it from a checkout. Modules:

- :mod:`bench.harness`: the interleaved run and its table (``python -m bench``);
- :mod:`bench.paths`: the timed paths (torch LS CE, the reference OLS module, server math, remote steps
  over the local and gRPC transports, a bare gRPC echo);
- :mod:`bench.baseline`: the reference OLS module (ankandrew/online-label-smoothing-pt), step for step;
- :mod:`bench.server`: a ``lossd serve`` child process on TCP loopback;
- :mod:`bench.echo_server`: a bare gRPC bytes echo (aio or sync server) and its client stream;
- :mod:`bench.grpc_servers`: the echo on a ``grpc.aio`` vs a sync thread-pool server (``python -m bench.grpc_servers``);
- :mod:`bench.machine`: what the figures ran on;
- :mod:`bench.memory`: the server's RSS per session, over 10,000 requests, and the 32000-class refusal.
"""

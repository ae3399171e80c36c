"""lossd's gRPC server: CE, label smoothing and Online Label Smoothing losses as a service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lossd")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

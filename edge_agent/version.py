"""The installed edgegen version, recorded in every bundle and shown by `edgegen --version`."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("edgegen")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0+source"

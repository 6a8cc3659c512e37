"""Helpers the tests share."""

from mnist_serving.server.launcher import ServerProcess

__all__ = ["ServerProcess"]

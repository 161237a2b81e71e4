"""``fastpix2pix serve``: a drawing page on loopback, each stroke translated by the generator."""

from fastpix2pix.serve.app import ServeApp, ServeOptions
from fastpix2pix.serve.http import ServeHTTPServer, make_server, run_in_thread, serve

__all__ = ["ServeApp", "ServeHTTPServer", "ServeOptions", "make_server", "run_in_thread", "serve"]

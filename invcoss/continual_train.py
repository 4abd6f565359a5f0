"""Deprecated alias of :mod:`invcoss.continual.train` (goes in invcoss 0.3)."""

from invcoss._deprecated import moved

__getattr__ = moved(__name__, "invcoss.continual.train")

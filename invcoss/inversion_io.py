"""Deprecated alias of :mod:`invcoss.inversion.files` and :mod:`invcoss.inversion.run` (goes in invcoss 0.3)."""

from invcoss._deprecated import moved

__getattr__ = moved(__name__, "invcoss.inversion.files", "invcoss.inversion.run")

"""Deprecated alias of :mod:`invcoss.inversion.report` (goes in invcoss 0.3)."""

from invcoss._deprecated import moved

__getattr__ = moved(__name__, "invcoss.inversion.report")

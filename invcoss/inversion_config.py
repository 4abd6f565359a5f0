"""Deprecated alias of :mod:`invcoss.inversion.config` and :mod:`invcoss.modality` (goes in invcoss 0.3)."""

from invcoss._deprecated import moved

__getattr__ = moved(__name__, "invcoss.inversion.config", "invcoss.modality")

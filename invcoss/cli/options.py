"""Parameter types shared by the commands, declared once.

:data:`MODALITY` takes every name of the modality registry (:mod:`invcoss.modality`), aliases
included and in any case, and hands the command the canonical name: ``--modality path`` and
``--modality Pathology`` both arrive as ``"pathology"``, in every command alike.
"""

from __future__ import annotations

import click

from invcoss.modality import canonical_modality, modality_choices


class ModalityType(click.Choice):
    """A modality name or alias, converted to the canonical name."""

    name = "modality"

    def __init__(self) -> None:
        super().__init__(modality_choices(), case_sensitive=False)

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return canonical_modality(super().convert(value, param, ctx))


MODALITY = ModalityType()

"""Wan's prompt cleaning (diffusers' ``pipeline_wan.prompt_clean``), shared by every umT5 encoder of the project.

diffusers applies ``ftfy.fix_text`` when ftfy is installed, then ``html.unescape`` twice and whitespace
collapsing; this does the same (without ftfy: diffusers' own no-ftfy path). Whether ftfy (and which
version) ran is part of a text cache's encoder fingerprint (``cleaning_description``), so entries made
with and without it never mix.
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.util
import re


class CaptionTruncatedWarning(UserWarning):
    """A caption had more tokens than ``max_length`` and was truncated."""


# ----------------------------------------------------------------------------------------------
# Prompt cleaning (diffusers' pipeline_wan.prompt_clean)


def _ftfy_version() -> str | None:
    if importlib.util.find_spec("ftfy") is None:
        return None
    return importlib.metadata.version("ftfy")


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy (when installed), html-unescape twice, collapse whitespace."""
    if _ftfy_version() is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def cleaning_description() -> str:
    version = _ftfy_version()
    ftfy = f"ftfy {version}" if version else "no ftfy"
    return f"wan prompt_clean ({ftfy}; html.unescape x2; whitespace collapsed)"

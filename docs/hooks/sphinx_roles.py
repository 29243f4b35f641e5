"""mkdocs hook: render the Sphinx roles of our docstrings (:func:`x`, :class:`~a.b.C`) as code.

mkdocstrings renders the docstrings as Markdown, where a role shows up as ``:func:<code>x</code>``;
this drops the role and, as Sphinx does for a ``~`` target, keeps the last dotted component.
"""
import re

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)

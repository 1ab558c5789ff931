"""``{known-mistakes}``: the oracle's list of known mistakes, read from
``centerkern.testing.KNOWN_MISTAKES`` when the site is built, so the page cannot fall behind it."""

from __future__ import annotations

import inspect

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class KnownMistakes(SphinxDirective):
    """A bulleted list: each known mistake as the oracle words it in its reports."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from centerkern.testing import KNOWN_MISTAKES, _mistakes

        self.env.note_dependency(inspect.getsourcefile(_mistakes))
        items = nodes.bullet_list()
        for mistake in KNOWN_MISTAKES:
            items += nodes.list_item("", nodes.paragraph(text=mistake.explanation))
        return [items]


def setup(app):
    app.add_directive("known-mistakes", KnownMistakes)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

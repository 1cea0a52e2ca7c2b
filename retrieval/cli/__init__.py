"""The command line, `retrieval` (click): parse, call one library function, print.

Owns every click import: nothing below this package imports click. One module per command
group: `index` (build, add, remove, compact, verify, info), `search` (search, serve), `train`
(train, export, bench), `demo` (synth, demo); `options` holds the options they share and
`group` the group itself, its logging and its one-line errors. May import every layer; heavy
ones (torch, FAISS) are imported inside the commands so that ``retrieval --help`` stays quick.
"""

from .group import main

__all__ = ["main"]

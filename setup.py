"""Build of the one C extension, `retrieval.index._skinny` (everything else is in pyproject.toml).

Optional: without a C compiler (or POSIX threads) the package installs anyway and exact search
uses BLAS alone.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3"]
setup(
    ext_modules=[
        Extension(
            "retrieval.index._skinny",
            ["retrieval/index/_skinny.c"],
            depends=["retrieval/index/_skinny_kernel.h", "retrieval/index/_skinny_workers.h"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)

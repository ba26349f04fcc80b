"""Build script: the package metadata lives in pyproject.toml; this file only adds
the optional compiled extensions, plain C through the CPython buffer protocol,
no link to torch: the codec core (``torch_dtdr.codecs._native``) and the inner
Reed-Solomon decoder of the archive parity level (``torch_dtdr.integrity._rs``).

When an extension cannot be built (no C compiler, no Python headers) the
install still succeeds and the package uses its numpy/torch reference for it,
saying so once at first use.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but let a failure leave a working pure-Python install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "no compiled core"
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._skip(exc, ext.name)

    @staticmethod
    def _skip(exc, name="torch_dtdr's extensions"):
        sys.stderr.write(
            f"WARNING: torch-dtdr's compiled extension {name} could not be built ({exc}); "
            "the package will use the slower numpy/torch reference in its place.\n"
        )


compile_args = []
if os.name != "nt":
    # Exact IEEE semantics: no fused multiply-add, no fast-math reassociation.
    compile_args = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-std=c99"]

setup(
    ext_modules=[
        Extension(
            "torch_dtdr.codecs._native",
            sources=["torch_dtdr/codecs/_native.c", "torch_dtdr/codecs/_literal_frames.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "torch_dtdr.integrity._rs",
            sources=["torch_dtdr/integrity/_rs.c"],
            extra_compile_args=compile_args,
            optional=True,
        ),
        Extension(
            "torch_dtdr.integrity._xxh",
            sources=["torch_dtdr/integrity/_xxh.c"],
            include_dirs=["third_party/xxhash"],
            depends=["third_party/xxhash/xxhash.h"],
            extra_compile_args=compile_args,
            optional=True,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)

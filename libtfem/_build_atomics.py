"""cffi API-mode build of tfem._atomics: the segment layout and its atomics.

The declarations below are the header's structs and the helper's functions;
`set_source` compiles tfem_atomics.c against tfem_segment.h, so the layout
Python sees is the one the C compiler laid out.
"""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _header_declarations() -> str:
    """The structs and constants of tfem_segment.h, in the form cdef takes."""
    text = (HERE / "tfem_segment.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        define = re.match(r"#define (TFEM_\w+) (\S+)", line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.startswith("#"):
            # cdef takes array lengths as numbers or "...": let the compiler say.
            lines.append(re.sub(r"\[[A-Z_][^\]]*\]", "[...]", line))
    return "\n".join(lines)


def _function_declarations() -> str:
    text = (HERE / "tfem_atomics.h").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith(("uint", "int", "void")))


ffibuilder = FFI()
ffibuilder.cdef(_header_declarations() + _function_declarations())
ffibuilder.set_source(
    "tfem._atomics",
    '#include "tfem_segment.h"\n#include "tfem_atomics.h"\n',
    sources=[str(HERE / "tfem_atomics.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""cffi API-mode build of tfem._native: the segment layout and the native core.

The declarations given to cdef are the headers' own, so the layout Python
sees is the one the C compiler laid out. tfem_states.h, the C copy of the
state machine and of the state word's layout, is generated from states.py,
the one place they are written (`write_states_header`, run by this module
and by the C API's build).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# What Python binds, in dependency order. tfem_layout.h is for the C files only.
HEADERS = ("tfem_segment.h", "tfem_geometry.h", "tfem_states.h", "tfem_atomics.h", "tfem_table.h", "tfem_file.h",
           "tfem_crc32c.h")
SOURCES = ("tfem_atomics.c", "tfem_geometry.c", "tfem_table.c", "tfem_file.c", "tfem_crc32c.c")
COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Werror=implicit-function-declaration"]


def _declarations(header: str) -> str:
    """A header in the form cdef takes: no comments, no preprocessor lines,
    constants and array lengths left for the compiler to fill in, no
    definitions with initialisers."""
    text = re.sub(r"/\*.*?\*/", "", (HERE / header).read_text(), flags=re.S)
    text = re.sub(r"static const[^;]*;", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        define = re.match(r"#define (TFEM_\w+) (\S+)", line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.startswith("#"):
            lines.append(re.sub(r"\[[A-Z_][^\]]*\]", "[...]", line))
    return "\n".join(lines)


def states_header() -> str:
    """tfem_states.h: states.py's transition table and state word as C."""
    spec = importlib.util.spec_from_file_location("_tfem_states", HERE.parent / "states.py")
    assert spec is not None and spec.loader is not None
    states = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(states)
    State, Event = states.State, states.Event
    events = sorted(Event, key=states.EVENT_NUMBER.__getitem__)
    lines = ["/* Generated from states.py by native/build.py: do not edit. */",
             "#ifndef TFEM_STATES_H", "#define TFEM_STATES_H", ""]
    lines += [f"#define TFEM_STATE_{state.name} {int(state)}" for state in sorted(State, key=int)]
    lines.append(f"#define TFEM_STATE_COUNT {len(State)}")
    lines += [f"#define TFEM_EVENT_{event.name} {states.EVENT_NUMBER[event]}" for event in events]
    lines.append(f"#define TFEM_EVENT_COUNT {len(events)}")
    lines += [f"#define TFEM_WORD_STATE_MASK {states.STATE_MASK:#x}",
              f"#define TFEM_WORD_GENERATION_SHIFT {states.GENERATION_SHIFT}",
              f"#define TFEM_WORD_GENERATION_MASK {states.GENERATION_MASK:#x}",
              f"#define TFEM_WORD_HOLDER_SHIFT {states.HOLDER_SHIFT}"]
    rows = []
    for state in sorted(State, key=int):
        row = [int(states.TRANSITIONS.get(state, {}).get(event, -1)) for event in events]
        rows.append("    {" + ", ".join(map(str, row)) + "},  /* " + state.name + " */")
    lines += ["", f"static const int TFEM_NEXT_STATE[{len(State)}][{len(events)}] = {{", *rows, "};"]
    lines.append(f"static const int TFEM_BUMPS_GENERATION[{len(events)}] = {{"
                 + ", ".join(str(int(e in states.BUMPS_GENERATION)) for e in events) + "};")
    lines.append(f"static const int TFEM_HELD[{len(State)}] = {{"
                 + ", ".join(str(int(s in states.HELD)) for s in sorted(State, key=int)) + "};")
    return "\n".join(lines + ["", "#endif", ""])


def write_states_header() -> None:
    path = HERE / "tfem_states.h"
    text = states_header()
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


write_states_header()

ffibuilder = FFI()
ffibuilder.cdef("\n".join(_declarations(h) for h in HEADERS))
ffibuilder.set_source(
    "tfem._native",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[str(HERE / source) for source in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=COMPILE_ARGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""cffi API-mode build of tfem._atomics: the segment layout and its C operations.

The declarations given to cdef are the headers' own (tfem_segment.h,
tfem_atomics.h, tfem_table.h), so the layout Python sees is the one the C
compiler laid out. tfem_states.h, the C copy of the state machine, is
generated here from states.py, the one place the transitions are written.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = ("tfem_segment.h", "tfem_atomics.h", "tfem_table.h")


def _declarations(header: str) -> str:
    """A header in the form cdef takes: no comments, no preprocessor lines,
    constants and array lengths left for the compiler to fill in."""
    text = re.sub(r"/\*.*?\*/", "", (HERE / header).read_text(), flags=re.S)
    lines = []
    for line in text.splitlines():
        define = re.match(r"#define (TFEM_\w+) (\S+)", line)
        if define:
            lines.append(f"#define {define.group(1)} ...")
        elif not line.startswith("#"):
            lines.append(re.sub(r"\[[A-Z_][^\]]*\]", "[...]", line))
    return "\n".join(lines)


def states_header() -> str:
    """tfem_states.h: the transition table of states.py as C arrays."""
    spec = importlib.util.spec_from_file_location("_tfem_states", HERE / "states.py")
    assert spec is not None and spec.loader is not None
    states = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(states)
    State, Event = states.State, states.Event
    events = sorted(Event, key=states.EVENT_NUMBER.__getitem__)
    lines = ["/* Generated from states.py by _build_atomics.py: do not edit. */",
             "#ifndef TFEM_STATES_H", "#define TFEM_STATES_H", "",
             f"#define TFEM_STATE_COUNT {len(State)}"]
    lines += [f"#define TFEM_EVENT_{event.name} {states.EVENT_NUMBER[event]}" for event in events]
    lines.append(f"#define TFEM_EVENT_COUNT {len(events)}")
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


(HERE / "tfem_states.h").write_text(states_header())

ffibuilder = FFI()
ffibuilder.cdef("\n".join(_declarations(h) for h in HEADERS))
ffibuilder.set_source(
    "tfem._atomics",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[str(HERE / "tfem_atomics.c"), str(HERE / "tfem_table.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

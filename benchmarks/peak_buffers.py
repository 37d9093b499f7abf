"""Issue 3: what is in memory at the peak of a train step (the buffers behind the memory ratio).

``benchmarks/train_step.py`` reports XLA's compiled peak (``memory_analysis()``: temp + output
bytes).  This script says what that peak is made of.  It compiles the same train steps, reads the
scheduled HLO of each (``Compiled.as_text()``: the entry computation in execution order), gives
every buffer a live range (from the instruction that defines it to its last use; bitcasts,
tuples and tuple elements alias their operands, parameters are arguments and not counted), finds
the point of the schedule where the most bytes are live, and groups the buffers live there by
the layer and op that made them (the ``op_name`` metadata, with ``layer_<i>`` merged over
layers) and by pass (forward: ``jvp``, backward: ``transpose``).

The estimate is checked against XLA's own figure and printed next to it.  It leaves out the
temporaries inside loops and other nested computations and any in-place reuse XLA does beyond
the aliases listed in :func:`buffers`, so it can be off by a few MiB.

Usage::

  python benchmarks/peak_buffers.py                       # frozen, tuned LoRA, BOFT m=1 auto
  python benchmarks/peak_buffers.py --only "lora r=8 tuned,boft m=4 auto" --factors 4 --top 25
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from _util import machine_description, markdown_table  # noqa: E402

# bits per element; "token" carries no data
_BITS = {"pred": 8, "s1": 1, "u1": 1, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "f4e2m1fn": 4, "s8": 8, "u8": 8,
         "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8, "f8e5m2": 8,
         "f8e5m2fnuz": 8, "f8e8m0fnu": 8, "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "f32": 32, "s32": 32,
         "u32": 32, "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTR = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_NOT_TEMP = {"parameter", "constant"}
# ops whose result is their operand's buffers (XLA runs a while loop's body in place on its state)
_SAME_BUFFERS = {"bitcast", "while", "opt-barrier", "async-done", "send-done", "recv-done", "all-reduce-done",
                 "all-gather-done", "collective-permute-done"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, e.g. ``f32[788,768]{1,0}`` or a tuple of arrays.

    Raises ``ValueError`` on an element type or a dimension it cannot size (e.g. a dynamic
    ``f32[<=8]``), rather than counting it as nothing."""
    total_bits = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype not in _BITS:
            raise ValueError(f"unknown element type {dtype!r} in HLO shape {shape!r}")
        n = 1
        for d in filter(None, dims.split(",")):
            if not d.isdigit():
                raise ValueError(f"cannot size dimension {d!r} of HLO shape {shape!r} (dynamic shapes are not supported)")
            n *= int(d)
        total_bits += n * _BITS[dtype]
    return (total_bits + 7) // 8


def tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape ``(a, b, (c, d))``; ``[shape]`` for an array."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    parts, depth, cur = [], 0, ""
    for ch in shape[1:shape.rindex(")")]:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One buffer defined by an instruction of the entry computation."""

    name: str
    bytes: int
    shape: str
    op_name: str  # the JAX op that produced it ('' when XLA made it)
    start: int  # schedule position of the defining instruction
    end: int  # last schedule position that reads it (outputs: the last position)


@dataclasses.dataclass(frozen=True)
class Peak:
    bytes: int
    position: int
    n_instructions: int
    live: tuple[Buffer, ...]  # largest first


def _entry_lines(hlo_text: str) -> list[str]:
    lines = hlo_text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("ENTRY")), None)
    if start is None:
        raise ValueError("no ENTRY computation in the HLO text (expected Compiled.as_text() of a jitted function)")
    body = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        if line.strip():
            body.append(line.strip())
    return body


def buffers(hlo_text: str) -> tuple[list[Buffer], int]:
    """Buffers of the (scheduled) entry computation with their live ranges, and its length.

    Each instruction stands for one set of buffers per top-level tuple element:
    ``get-tuple-element`` takes its element's, ``tuple`` gathers its operands', bitcasts, while
    loops and optimization barriers pass their operand's on, an ``*-start`` op makes its first
    element (the destination) and passes its operand's on as the second, ``copy-done`` passes on
    the destination and other ``*-done`` ops all of their operand's (an over-count), and every
    other op makes a new buffer per element (a multi-output fusion: one per output).
    Parameters and constants are not temporaries.  A buffer is live from the op that makes it
    to the last op that reads it, directly or through any of those aliases.
    """
    elements: dict[str, list[tuple[str, ...]]] = {}  # instruction -> buffers of each tuple element
    defined: dict[str, tuple[int, int, str, str]] = {}
    last_use: dict[str, int] = {}
    lines = _entry_lines(hlo_text)
    for pos, line in enumerate(lines):
        m = _INSTR.match(line)
        if m is None:
            continue
        name, shape, opcode, rest = m.groups()
        operand_text = rest.split("), ", 1)[0]
        operands = [o for o in re.findall(r"%?([\w.\-]+)", operand_text) if o in elements]
        flat = [tuple(b for e in elements[o] for b in e) for o in operands]
        for bufs in flat:
            for b in bufs:
                last_use[b] = pos
        shapes = tuple_elements(shape)
        op_name = re.search(r'op_name="([^"]*)"', line)

        def new(i: int) -> tuple[str, ...]:
            bid = name if len(shapes) == 1 else f"{name}#{i}"
            defined[bid] = (pos, shape_bytes(shapes[i]), shapes[i].split("{")[0], op_name.group(1) if op_name else "")
            return (bid,)

        if opcode in _NOT_TEMP:
            elements[name] = [()] * len(shapes)
        elif opcode == "tuple":
            elements[name] = flat
        elif opcode == "get-tuple-element":
            index = re.search(r"index=(\d+)", rest)
            parts = elements[operands[0]] if operands else [()]
            k = int(index.group(1)) if index else -1
            elements[name] = [parts[k]] if 0 <= k < len(parts) else [tuple(b for e in parts for b in e)]
        elif opcode == "copy-done" and operands:  # copy-start's (destination, source, context)
            elements[name] = [elements[operands[0]][0]]
        elif opcode in _SAME_BUFFERS and operands:
            parts = elements[operands[0]]
            elements[name] = parts if len(parts) == len(shapes) else [tuple(b for e in parts for b in e)]
        elif opcode.endswith("-start") and len(shapes) > 1 and operands:
            elements[name] = [new(0), flat[0]] + [new(i) for i in range(2, len(shapes))]
        else:
            elements[name] = [new(i) for i in range(len(shapes))]
    if not defined:
        raise ValueError("found no instructions in the ENTRY computation: is this XLA's HLO text format?")
    out = [Buffer(bid, size, shp, op_name, pos, last_use.get(bid, pos))
           for bid, (pos, size, shp, op_name) in defined.items()]
    return out, len(lines)


def peak(hlo_text: str) -> Peak:
    """The schedule position with the most live bytes, and the buffers live there."""
    bufs, n = buffers(hlo_text)
    delta = [0] * (n + 1)
    for b in bufs:
        delta[b.start] += b.bytes
        delta[b.end + 1] -= b.bytes
    live, best, where = 0, -1, 0
    for pos in range(n):
        live += delta[pos]
        if live > best:
            best, where = live, pos
    live_bufs = sorted((b for b in bufs if b.start <= where <= b.end), key=lambda b: -b.bytes)
    return Peak(best, where, n, tuple(live_bufs))


def role(op_name: str) -> str:
    """``'<pass> <layer part>'`` for grouping, e.g. ``'fwd mlp/fc1 dot_general'``."""
    if not op_name:
        return "(made by XLA)"
    phase = "bwd" if "transpose(" in op_name else "fwd"
    m = re.search(r"layer_\d+/(.*)", op_name)
    tail = m.group(1) if m else op_name.split("/")[-1]
    parts = [p for p in tail.split("/") if not p.startswith("jit(") and not p.endswith(".adapted")]
    where = "/".join(parts[:-1]) or "-"
    return f"{phase} {where} {parts[-1] if parts else ''}".strip()


def grouped(p: Peak) -> dict[str, tuple[int, int]]:
    """``role -> (bytes, buffers)`` of the buffers live at the peak."""
    acc: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for b in p.live:
        acc[role(b.op_name)][0] += b.bytes
        acc[role(b.op_name)][1] += 1
    return {k: (v[0], v[1]) for k, v in acc.items()}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> None:
    import train_step

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    train_step.add_build_args(p, only_default="frozen,lora r=8 tuned,boft m=1 auto")
    p.add_argument("--top", type=int, default=20, help="rows of the table (largest groups over all candidates)")
    args = p.parse_args(argv)
    print(f"# peak_buffers: ViT-B/16 shapes, {args.layers} layers, batch {args.batch}, {args.tokens} tokens,"
          f" {args.dtype}, b = {args.block_size}")
    print(f"# {machine_description()}")
    cands = train_step.build(args)
    if not cands:
        raise SystemExit(f"--only {args.only!r} matched no candidate of benchmarks/train_step.py")
    groups, summary = {}, []
    for c in cands:
        mem = train_step._memory(c)  # compiles the step once, into c.compiled
        xla = mem["temp"] + mem["out"] if mem else None
        pk = peak(c.compiled.as_text())
        groups[c.name] = grouped(pk)
        summary.append([c.name, _mib(pk.bytes), _mib(xla) if xla is not None else "-",
                        f"{pk.position}/{pk.n_instructions}", str(len(pk.live))])
    print(markdown_table(["candidate", "peak MiB (schedule estimate)", "XLA temp+out MiB", "at instruction",
                          "live buffers"], summary))
    totals = collections.Counter()
    for g in groups.values():
        for k, (size, _) in g.items():
            totals[k] = max(totals[k], size)
    keys = [k for k, _ in totals.most_common(args.top)]
    rows = []
    for k in keys:
        row = [k]
        for c in cands:
            size, count = groups[c.name].get(k, (0, 0))
            row.append(f"{_mib(size)} ({count})" if count else "-")
        rows.append(row)
    rest = [["(all other groups)"] + [_mib(sum(s for k, (s, _) in groups[c.name].items() if k not in keys))
                                      for c in cands]]
    print(f"\nMiB live at each candidate's peak, by pass and producing op (buffers), the {len(keys)} largest groups:")
    print(markdown_table(["pass, layer part, op"] + [c.name for c in cands], rows + rest))


if __name__ == "__main__":
    main()

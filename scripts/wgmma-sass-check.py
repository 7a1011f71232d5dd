#!/usr/bin/env python3
"""Checks ptxas' SASS of the wgmma attention kernels for what no CPU test can see.

wgmma writes its accumulators, and reads its A registers, asynchronously: between an HGMMA and
the WARPGROUP.DEPBAR that waits for it, no other instruction may touch those registers. The
kernels tie them in place (fence_regs) so the compiler keeps its reads after the wait; this
reads the compiled code to confirm it did. (scripts/cuda-check.sh checks ptxas' own output
for spills and serialised wgmma.)

Usage: wgmma-sass-check.py SASS_FILE   (cuobjdump -sass of flash_wgmma.cu built for sm_90a)
Exits 1 on a hazard, with the instruction named.
"""
import re
import sys


def instructions(body):
    """Each instruction's text without its address and encoding; a predicate guard (@P0) is
    dropped, so the opcode comes first."""
    for line in body.split("\n"):
        if re.search(r"/\*[0-9a-f]{4,}\*/", line):
            text = re.sub(r"\s*/\*[0-9a-f]{4,}\*/\s*", "", line.split(";")[0]).strip()
            text = re.sub(r"^@!?U?P\w+\s+", "", text)
            if text:
                yield text


def registers(opcode, operand):
    """The registers an operand names: a .64 or .128 opcode's register operands span 2 or 4
    registers (counted as 4 either way, erring towards reporting)."""
    first = int(operand)
    return range(first, first + (4 if re.search(r"\.(64|128)\b", opcode) else 1))


def check(name, body):
    """(HGMMA count, hazards) of one function."""
    in_flight = []  # (first, last register, what)
    hazards, hgmma = [], 0
    for text in instructions(body):
        m = re.match(r"HGMMA\.64x(\d+)x16\.F32\.BF16 R(\d+), (?:R(\d+), )?", text)
        if m:
            hgmma += 1
            n, d = int(m.group(1)), int(m.group(2))
            in_flight.append((d, d + n // 2 - 1, "accumulators"))
            if m.group(3):
                a = int(m.group(3))
                in_flight.append((a, a + 3, "A registers"))
            continue
        if text.startswith("WARPGROUP.DEPBAR"):
            # The kernels only ever wait for every group (wait_group 0).
            in_flight = []
            continue
        if text.startswith("WARPGROUP.ARRIVE"):
            continue
        opcode, _, operands = text.partition(" ")
        regs = [r for o in re.findall(r"\bR(\d+)\b", operands) for r in registers(opcode, o)]
        dest = re.match(r"\s*R(\d+)", operands)
        written = registers(opcode, dest.group(1)) if dest and not opcode.startswith("ST") else []
        for first, last, what in in_flight:
            if what == "accumulators" and any(first <= r <= last for r in regs):
                hazards.append(f"{name}: {text} touches in-flight {what} R{first}-R{last}")
            if what == "A registers" and any(first <= r <= last for r in written):
                hazards.append(f"{name}: {text} overwrites in-flight {what} R{first}-R{last}")
    return hgmma, hazards


def main():
    sass = "\n" + open(sys.argv[1]).read()
    failed, seen = False, 0
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n")[0].strip()
        if "wgmma" not in name:
            continue
        seen += 1
        hgmma, hazards = check(name, body)
        print(f"{name}: {hgmma} HGMMA, {len(hazards)} register hazards")
        for h in hazards[:10]:
            print("  " + h)
        failed |= bool(hazards) or hgmma == 0
    if seen == 0:
        print("no wgmma function in the SASS")
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

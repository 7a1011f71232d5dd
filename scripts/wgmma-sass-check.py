#!/usr/bin/env python3
"""Checks ptxas' SASS of the wgmma kernels (attention, convolution) for what no CPU test can see.

wgmma writes its accumulators, and reads its A registers, asynchronously: between an HGMMA and
the WARPGROUP.DEPBAR that waits for it, no other instruction may touch those registers. The
kernels tie them in place (fence_regs) so the compiler keeps its reads after the wait; this
reads the compiled code to confirm it did. (scripts/cuda-check.sh checks ptxas' own output
for spills and serialised wgmma.)

Usage: wgmma-sass-check.py SASS_FILE   (cuobjdump -sass of a wgmma .cu file built for sm_90a)
Exits 1 on a hazard, with the instruction named. A planted sample is checked first.
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


# Hazards the check must find, run before every real check so a regex that stops matching
# (cuobjdump's format changes) fails loudly instead of passing everything.
PLANTED = """
        Function : headshot_flash_attn_wgmma_planted
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR12], R88, gsb0 ;
        /*0030*/                   FMNMX R2, R90, R91, !PT ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR12], R24, gsb0 ;
        /*0060*/                   MOV R101, R3 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*10000*/                  HGMMA.64x64x16.F32.BF16 R88, gdesc[UR12], R88, gsb0 ;
        /*10010*/                  @P0 STG.E.64 desc[UR4][R2.64], R86 ;
        /*10020*/                  WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*10030*/                  FMNMX R2, R90, R91, !PT ;
"""


def self_test():
    """The planted sample's three hazards (an accumulator read, an A-register write, a
    predicated 64-bit store at a 5-digit address) are found, and the read after the last wait
    is not."""
    _, hazards = check("planted", PLANTED.split("Function : ", 1)[1])
    want = ["FMNMX R2, R90, R91, !PT", "MOV R101, R3", "STG.E.64 desc[UR4][R2.64], R86"]
    found = [h.split(": ", 1)[1].split(" touches")[0].split(" overwrites")[0] for h in hazards]
    if found != want:
        print(f"wgmma-sass-check self-test: found {found}, want {want}")
        sys.exit(1)


def main():
    self_test()
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

"""Read sm_90 SASS without a GPU: the static figures that decide a memory-bound kernel's speed.

The project's own reader (``../shared/tools/sass/`` is a measuring aid, not a dependency). Used by
posenc_dev/static_compile.py (Triton kernels: tests/static/, scripts/static_figures,
scripts/static_peers) and scripts/check_cuda_compile (the CUDA C++ kernels).

Figures, for one kernel's SASS (``cuobjdump -sass`` of the cubin):

* **The fast path.** The longest entry-to-EXIT path through the control-flow graph (most instructions:
  the worst case of one warp), never entering a block that reads module constants (``c[0x4][...]``). In
  these kernels the only module constants are libdevice's bits of 2/pi, read by the Payne-Hanek reduction
  that precise ``sinf``/``cosf`` run for ``|x| > 105615``; that block is reported separately as the slow
  path (a lane with such an angle pays it; exact-angle kernels reduce first and never do). Predicated
  instructions count as executed. A loop's body is repeated ``trips`` times along the path.
* **Load rounds.** A warp issues in order and waits at the first instruction that reads (or overwrites)
  a register a pending global load writes. So a load issued after the warp waited for a load of round
  ``r`` is in round ``r + 1`` at the earliest: its latency cannot overlap the earlier one. ``rounds`` is
  the highest round on the path: the memory latencies a program waits through one after another.
* **Bytes in flight.** The most global-load bytes per thread issued and not yet waited for, along the
  path (Little's law: what one thread contributes to hiding a memory latency).
* **Instructions.** Warp-instructions on the path; divided by the DRAM bytes a warp is responsible for,
  the issue cost per byte (the caller knows the bytes: see ``instructions_per_byte``).
* **Resources.** Registers, stack and static shared memory (``cuobjdump -res-usage``), and resident
  blocks per SM (``occupancy``, sm_90 limits).
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm``: the copy bundled with Triton's NVIDIA backend, else the CUDA toolkit's."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(f"{name}: not bundled with triton and not on PATH")


def _cuobjdump(data: bytes | str, flag: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = data if isinstance(data, str) else os.path.join(d, "k.cubin")
        if not isinstance(data, str):
            with open(path, "wb") as f:
                f.write(data)
        res = subprocess.run([tool("cuobjdump"), flag, path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {res.stderr.strip()[-500:]}")
    return res.stdout


# ---------------------------------------------------------------------------------------------- parsing

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_REG = re.compile(r"(?<![\w.])(!?)(R\d+|P\d+)(\.64)?(?!\w)")

# Opcodes with no register destination: every register operand is read.
_NO_DEST = {"STG", "STS", "STL", "ST", "RED", "REDG", "BAR", "BRA", "BRX", "EXIT", "RET", "CALL", "MEMBAR", "WARPSYNC",
            "BSSY", "BSYNC", "DEPBAR", "NOP", "STSM", "ERRBAR", "CCTL", "YIELD", "JMP", "JMX"}  # fmt: skip
GLOBAL_LOADS = {"LDG"}
GLOBAL_STORES = {"STG", "RED", "REDG", "ATOMG"}


@dataclass
class Instr:
    addr: int
    pred: str  # "" or the guarding predicate ("P0", "!P1")
    op: str  # opcode with modifiers: "LDG.E.128.CONSTANT"
    operands: str
    dests: frozenset = field(default_factory=frozenset)
    srcs: frozenset = field(default_factory=frozenset)

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def width(self) -> int:
        """Bytes per thread of a memory access (16 for .128, 8 for .64, 2 for .U16, 4 otherwise)."""
        mods = set(self.op.split(".")[1:])
        for mod, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if mod in mods:
                return nbytes
        return 4


def _dest_regs(op: str, reg: str, pair: bool) -> set:
    """Registers an instruction's destination operand covers (vector loads and 64-bit results span several)."""
    if reg.startswith("P"):
        return {reg}
    n = int(reg[1:])
    base, mods = op.split(".")[0], set(op.split(".")[1:])
    if base in ("LDG", "LDS", "LDL", "LD", "LDC", "LDSM", "ULDC") and "128" in mods:
        width = 4
    elif pair or "64" in mods or "WIDE" in mods or "F64" in mods or base in ("DADD", "DMUL", "DFMA", "DSETP"):
        width = 2
    else:
        width = 1
    return {f"R{n + i}" for i in range(width)} if n != 255 else set()


def _operand_regs(text: str) -> set:
    out = set()
    for m in _REG.finditer(text):
        reg = m.group(2)
        if reg in ("R255", "P7"):  # RZ / PT spelled numerically
            continue
        out.add(reg)
        if m.group(3):  # R4.64 is the pair R4, R5
            out.add(f"R{int(reg[1:]) + 1}")
    return out


def _wide_sources(op: str, base: str, parts: list) -> set:
    """The other registers of multi-register source operands: a vector store's data (``STG.E.128 [..], R8``
    reads R8-R11), double-precision operands (pairs) and the 64-bit addend of ``IMAD.WIDE``."""
    out: set = set()

    def span(operand: str, n: int):
        m = re.fullmatch(r"-?\|?R(\d+)(?:\.\w+)*\|?", operand.strip())
        if m and m.group(1) != "255":
            out.update(f"R{int(m.group(1)) + i}" for i in range(1, n))

    mods = set(op.split(".")[1:])
    if base in ("STG", "STS", "STL", "ST", "RED", "REDG") and parts:
        span(parts[-1], 4 if "128" in mods else 2 if "64" in mods else 1)
    elif base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "F2F", "F2I") and parts:
        for operand in parts[1:]:
            span(operand, 2 if base[0] == "D" or "F64" in mods else 1)
    elif "WIDE" in mods and len(parts) >= 4:
        span(parts[3], 2)
    return out


def _instr(addr: int, text: str) -> Instr:
    pred = ""
    if text.startswith("@"):
        pred, text = text[1:].split(None, 1)
    op, _, operands = text.partition(" ")
    operands = operands.strip()
    parts = [p.strip() for p in operands.split(",")] if operands else []
    base = op.split(".")[0]
    srcs = _operand_regs(operands) if base in _NO_DEST or not parts else _operand_regs(",".join(parts[1:]))
    srcs |= _wide_sources(op, base, parts)
    dests: set = set()
    if base not in _NO_DEST and parts:
        first = _REG.search(parts[0])
        if first and not first.group(1):
            dests = _dest_regs(op, first.group(2), bool(first.group(3)))
            # a second predicate destination (ISETP P0, P1, ...; IADD3 R0, P0, ...)
        for extra in parts[1:3]:
            m = re.fullmatch(r"P(\d)", extra)
            if m and base in ("ISETP", "FSETP", "DSETP", "IADD3", "LEA", "IMAD", "PLOP3", "HSETP2", "LOP3"):
                if extra != "P7":
                    dests.add(extra)
    if pred:
        srcs.add(pred.lstrip("!"))
    srcs.discard("PT")
    return Instr(addr, pred, op, operands, frozenset(dests), frozenset(srcs))


def parse(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` text -> {kernel name: its instructions in address order, NOPs dropped}."""
    out = {}
    heads = list(_FUNC.finditer(text))
    for j, h in enumerate(heads):
        body = text[h.end(): heads[j + 1].start() if j + 1 < len(heads) else len(text)]
        ins, seen = [], set()
        for m in _INSTR.finditer(body):
            addr = int(m.group(1), 16)
            if addr in seen:
                continue
            seen.add(addr)
            i = _instr(addr, m.group(2).strip())
            if i.base != "NOP":
                ins.append(i)
        # the trailing `BRA self` after the last EXIT is padding
        while ins and ins[-1].base == "BRA" and _target(ins[-1]) == ins[-1].addr:
            ins.pop()
        out[h.group(1)] = ins
    return out


def disassemble(cubin: bytes | str) -> dict[str, list[Instr]]:
    """The SASS of every kernel in a cubin (bytes) or a cubin/object file (path)."""
    return parse(_cuobjdump(cubin, "-sass"))


def resources(cubin: bytes | str) -> dict[str, dict]:
    """{kernel: {"regs", "stack", "shared", "local"}} from ``cuobjdump -res-usage``."""
    out, name = {}, None
    for line in _cuobjdump(cubin, "-res-usage").splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            out[name] = dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))
    return out


# ---------------------------------------------------------------------------------------------- control flow


def _target(i: Instr):
    m = re.search(r"\b0x([0-9a-f]+)\b", i.operands)
    return int(m.group(1), 16) if m else None


@dataclass
class Block:
    first: int  # index of the first instruction
    end: int  # one past the last
    succ: list  # forward successors (block indices)
    back: list  # loop headers this block branches back to
    slow: bool  # reads module constants: libdevice's large-argument reduction


def cfg(ins: list[Instr]) -> list[Block]:
    """Basic blocks in address order (a topological order of the forward edges), with back edges apart."""
    addrs = [i.addr for i in ins]

    def index_of(target):
        """The instruction a branch lands on (a target at a dropped NOP lands on the next kept one)."""
        if target is None:
            return None
        k = bisect.bisect_left(addrs, target)
        return k if k < len(ins) else None

    starts = {0}
    for n, i in enumerate(ins):
        if i.base in ("BRA", "EXIT", "RET", "BRX", "JMX"):
            starts.add(n + 1)
            t = index_of(_target(i)) if i.base == "BRA" else None
            if t is not None:
                starts.add(t)
    starts = sorted(s for s in starts if s < len(ins))
    index = {s: j for j, s in enumerate(starts)}
    blocks = []
    for j, s in enumerate(starts):
        e = starts[j + 1] if j + 1 < len(starts) else len(ins)
        last = ins[e - 1]
        succ, back = [], []
        falls = j + 1 < len(starts) and (last.base not in ("BRA", "EXIT", "RET", "BRX", "JMX") or last.pred)
        t = index_of(_target(last)) if last.base == "BRA" else None
        if t is not None:
            t = index[t]
            (back if t <= j else succ).append(t)
        if falls:
            succ.append(j + 1)
        slow = any("c[0x4]" in i.operands for i in ins[s:e])
        blocks.append(Block(s, e, succ, back, slow))
    # A latch that only branches back (a top-tested loop) leaves the forward graph through its header's
    # exit: give it that edge, so a path can run the body and still reach the code after the loop.
    for j, b in enumerate(blocks):
        for h in b.back:
            for k in blocks[h].succ:
                if k > j and k not in b.succ:
                    b.succ.append(k)
    return blocks


def path(ins: list[Instr], trips: int = 1, fast: bool = True) -> list[Instr]:
    """The instructions of the longest entry-to-exit path (see the module doc); loop bodies ``trips`` times.

    With ``fast``, blocks that read module constants (the slow path of libdevice's trig) are avoided
    unless no exit is reachable without them."""
    if not ins:
        return []
    blocks = cfg(ins)
    in_loop = [1] * len(blocks)
    for j, b in enumerate(blocks):
        for h in b.back:
            for k in range(h, j + 1):
                in_loop[k] = trips
    exits = []
    for avoid_slow in ((True, False) if fast else (False,)):
        best, prev = [None] * len(blocks), [None] * len(blocks)
        if not (avoid_slow and blocks[0].slow):
            best[0] = (blocks[0].end - blocks[0].first) * in_loop[0]
        exits = []
        for j, b in enumerate(blocks):
            if best[j] is None:
                continue
            if ins[b.end - 1].base in ("EXIT", "RET"):
                exits.append(j)
            for k in b.succ:
                if avoid_slow and blocks[k].slow:
                    continue
                cand = best[j] + (blocks[k].end - blocks[k].first) * in_loop[k]
                if best[k] is None or cand > best[k]:
                    best[k], prev[k] = cand, j
        if exits:
            break
    if not exits:
        raise ValueError("no path from the entry reaches an EXIT: the control-flow graph was misread")
    j, chain = max(exits, key=lambda e: best[e]), []
    while j is not None:
        chain.append(j)
        j = prev[j]
    chain.reverse()
    seq, n = [], 0
    while n < len(chain):
        j = chain[n]
        latch = max((k for k in chain[n:] if j in blocks[k].back), default=None)
        if latch is not None and trips > 1:
            body = [k for k in chain[n:] if k <= latch]
            for _ in range(trips):
                for k in body:
                    seq += ins[blocks[k].first:blocks[k].end]
            n += len(body)
        else:
            seq += ins[blocks[j].first:blocks[j].end]
            n += 1
    return seq


# ---------------------------------------------------------------------------------------------- figures


def load_rounds(seq: list[Instr]) -> dict:
    """Serialised global-load round trips along ``seq`` and the most load bytes per thread in flight."""
    pending: dict = {}  # register -> load number
    loads: dict = {}  # load number -> (round, bytes)
    waited_round = 0
    in_flight = most = 0
    per_round: dict = {}
    for n, i in enumerate(seq):
        hit = {pending[r] for r in (i.srcs | i.dests) if r in pending}
        for ld in hit:
            rnd, nbytes = loads.pop(ld)
            waited_round = max(waited_round, rnd)
            in_flight -= nbytes
        if hit:
            pending = {r: ld for r, ld in pending.items() if ld not in hit}
        if i.base in GLOBAL_LOADS and i.dests:
            rnd = waited_round + 1
            loads[n] = (rnd, i.width)
            for r in i.dests:
                pending[r] = n
            in_flight += i.width
            most = max(most, in_flight)
            per_round[rnd] = per_round.get(rnd, 0) + i.width
    return {"rounds": max(per_round, default=0), "in_flight_bytes": most, "load_bytes_per_round": per_round}


def access_widths(seq, bases) -> dict:
    """bits -> count of the memory accesses in ``seq`` whose opcode is in ``bases``."""
    out: dict = {}
    for i in seq:
        if i.base in bases:
            out[i.width * 8] = out.get(i.width * 8, 0) + 1
    return dict(sorted(out.items()))


def kernel_figures(ins: list[Instr], trips: int = 1) -> dict:
    """Every figure of one kernel's SASS (module doc); widths are bits -> count of accesses on the path."""
    fast = path(ins, trips, fast=True)
    slow = path(ins, trips, fast=False)
    return {
        **load_rounds(fast),
        "path_instructions": len(fast),
        "path_loads": access_widths(fast, GLOBAL_LOADS),
        "path_stores": access_widths(fast, GLOBAL_STORES),
        "path_load_bytes": sum(i.width for i in fast if i.base in GLOBAL_LOADS),
        "path_store_bytes": sum(i.width for i in fast if i.base in GLOBAL_STORES),
        "path_calls": sum(1 for i in fast if i.base == "CALL"),
        "path_local": sum(1 for i in fast if i.base in ("LDL", "STL")),
        "slow_path_rounds": load_rounds(slow)["rounds"],
        "static_instructions": len(ins),
    }


def instructions_per_byte(path_instructions: int, num_warps: int, dram_bytes_per_program: float) -> float:
    """Warp-instructions a program issues per DRAM byte it is responsible for."""
    return path_instructions * num_warps / dram_bytes_per_program


# sm_90 (H100 / H200) limits per SM
SM90 = dict(regs=65536, reg_alloc=256, threads=2048, warps=64, blocks=32, smem=228 * 1024, smem_reserved=1024)


def occupancy(regs: int, num_warps: int, smem_bytes: int, threads_per_warp: int = 32) -> dict:
    """Resident blocks per SM and what limits them (registers are allocated per warp in 256-register units)."""
    per_warp = -(-max(regs, 1) * threads_per_warp // SM90["reg_alloc"]) * SM90["reg_alloc"]
    limits = {
        "registers": SM90["regs"] // per_warp // num_warps,
        "warps": SM90["warps"] // num_warps,
        "blocks": SM90["blocks"],
        "shared": SM90["smem"] // (smem_bytes + SM90["smem_reserved"]) if smem_bytes else SM90["blocks"],
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * num_warps / SM90["warps"], 3), "limiter": limiter}

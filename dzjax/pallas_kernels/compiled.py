"""The kernels as the GPU compiler sees them, on a host without a GPU: lowering for CUDA, Triton
compilation to PTX and a cubin for sm_90, and what the PTX says (registers, spills, instructions
per K step). Used by the compiler checks in the tests and by `benchmarks/kernels.py --ptx`.

  lower_for_cuda(fn, *args)            StableHLO text of fn(*args) for an abstract H100
  triton_ir(fn, *args)                 the Triton IR of every pallas_call in fn(*args)
  compile_sm90(ttir, num_warps=, num_stages=)   {"ptx", "cubin", "ttgir"} (needs `triton`)
  ptxas_report(ptx)                    registers and spill bytes, from ptxas -v
  loop_instructions(ptx)               instruction counts of the K loop's body, per thread
                                       (of the kernel's whole row tile: the last K loop)
  sass_loop(cubin)                     that K loop's machine code (nvdisasm), what issues
  sass_loop_instructions(cubin)        its instruction counts
  ptx_loops(ptx), sass_loops(cubin)    every K loop: the multi-delta kernel has one a row tile

`triton` is not a dependency (`pip install "dzjax[compile-check]"`); only `compile_sm90` and
`ptxas_report` need it, and they raise ImportError without it. `triton_ir` uses a private hook of
the Pallas Triton lowering and raises RuntimeError if this jax moved it.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import jax

from dzjax.pallas_kernels.formats import FIELDS, QuantizedTensor


def abstract_delta(k: int, n: int, fmt) -> QuantizedTensor:
    """A [K, N] delta of `fmt` whose leaves are shapes only (no data): for lowering big shapes."""
    sds = {f: jax.ShapeDtypeStruct(shape, dtype)
           for f, (shape, dtype) in fmt.stored_arrays(k, n).items()}
    return QuantizedTensor(**{f: sds.get(f) for f in FIELDS}, shape=(k, n), format=fmt)


def lower_for_cuda(fn, *args) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for CUDA, with an abstract H100 as the
    device: no GPU or CUDA plugin needed. Array leaves of args may be ShapeDtypeStructs."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()


def triton_ir(fn, *args) -> list[str]:
    """The Triton IR text of every pallas_call in fn(*args), lowered for an abstract H100."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
        original = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as e:  # pragma: no cover - a jax that moved it
        raise RuntimeError(f"this jax does not expose the Pallas Triton lowering: {e}") from e
    captured = []

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    jax.clear_caches()  # a cached lowering would not call the hook
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        lower_for_cuda(fn, *args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    if not captured:
        raise RuntimeError("no pallas_call was lowered")
    return captured


def compile_sm90(ttir: str, *, num_warps: int, num_stages: int) -> dict[str, str | bytes]:
    """Triton's own passes (layouts, pipelining, PTX, ptxas) on one kernel's IR, for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        # Triton skips the passes of a stage it is given the output of: run the TTIR ones
        # (inlining, canonicalization, `dot(a, b, 0) + c -> dot(a, b, c)`, CSE, loop unrolling)
        # first, as XLA's Triton pipeline does for a pallas_call.
        path.write_text(_ttir_passes(path, num_warps=num_warps, num_stages=num_stages))
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        return {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"],
                "ttgir": compiled.asm["ttgir"]}


def _ttir_passes(path: Path, *, num_warps: int, num_stages: int) -> str:
    """The Triton IR at `path` after Triton's own TTIR passes (`make_ttir`), for sm_90."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(str(path), context)
    module.context = context
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    return str(backend.make_ttir(module, {}, options, 90))


def ptxas_report(ptx: str) -> dict[str, int]:
    """{"registers", "spill_bytes"} of the kernel, from `ptxas -v` (the one in the triton wheel)."""
    ptxas = _tool("ptxas-blackwell", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(source), "-o",
                                 str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if report.returncode:
        raise RuntimeError(f"ptxas failed: {report.stderr[-2000:]}")
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report.stderr)]
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", report.stderr)]
    if not registers or not spills:
        raise RuntimeError(f"unexpected ptxas report: {report.stderr[-2000:]}")
    return {"registers": max(registers), "spill_bytes": max(spills)}


def _tool(*names: str) -> Path:
    """The first of `names` that the triton wheel ships among its CUDA tools."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    path = next((bin_dir / n for n in names if (bin_dir / n).exists()), None)
    if path is None:  # pragma: no cover - every triton wheel for CUDA ships them
        raise ImportError(f"no {' or '.join(names)} in {bin_dir}")
    return path


def _k_loops(text: str, label: str, branch: str, mma: str) -> list[list[str]]:
    """The lines of each innermost loop (one that holds no other) of assembly `text` that has
    tensor-core instructions, in increasing order of their count (the multi-delta kernel's
    loops over 8, 16, ... rows; `multi_delta.row_tile_sizes`): `label` matches a label line,
    `branch` a branch to a label (both with the label as group 1), and `mma` a tensor-core
    instruction."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(label, line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)  # backward branches
             if (m := re.search(branch, line)) and labels.get(m.group(1), i) < i]
    found = []
    for start, end in sorted(loops):
        inner = any(start <= a and b <= end and (a, b) != (start, end) for a, b in loops)
        body = lines[start:end + 1]
        mmas = sum(bool(re.search(mma, line)) for line in body)
        if not inner and mmas:
            found.append((mmas, start, body))
    return [body for *_, body in sorted(found, key=lambda f: f[:2])]


_SASS_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_loops(cubin: bytes) -> list[list[str]]:
    """The K loops of the machine code (SASS, from the wheel's nvdisasm), as their lines, in
    increasing order of tensor-core instructions (`_k_loops`): what the SM issues, after ptxas
    has fused and dropped instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_tool("nvdisasm")), "-c", str(path)], capture_output=True,
                              text=True, check=True).stdout
    return _k_loops(text, r"\s*\.?(L_x_\d+):", r"\bBRA\b.*?\.?(L_x_\d+)", r"\bHG?MMA\b")


def sass_loop(cubin: bytes) -> list[str]:
    """The K loop of the machine code of the kernel's whole row tile (the last of
    `sass_loops`). Empty when there is none."""
    return (sass_loops(cubin) or [[]])[-1]


def sass_loop_instructions(cubin_or_loop: bytes | list[str]) -> collections.Counter:
    """`loop_instructions` of the machine code (of a cubin, or of its `sass_loop` lines): an AND
    and an OR become one LOP3, moves vanish or appear. Empty when there is no K loop."""
    loop = sass_loop(cubin_or_loop) if isinstance(cubin_or_loop, bytes) else cubin_or_loop
    return collections.Counter(m.group(1) for line in loop if (m := _SASS_OP.search(line)))


def ptx_loops(ptx: str) -> list[collections.Counter]:
    """Instruction counts (per thread) of each K loop in the PTX: the innermost loops (ones that
    hold no other) with tensor-core instructions, one K step each after Triton's pipelining,
    in increasing order of those (`_k_loops`); the multi-delta kernel's loops over row tiles
    around them are left out. Empty when there is none (a kernel whose K steps were fully
    unrolled)."""
    bodies = _k_loops(ptx, r"\s*(\$L__BB\d+_\d+):", r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);",
                      r"^\s+(?:@!?%p\d+\s+)?(?:wg)?mma\.")
    return [collections.Counter(m.group(1) for line in body
                                if (m := re.match(r"^\s+(?:@!?%p\d+\s+)?([a-z][\w.]*)", line)))
            for body in bodies]


def loop_instructions(ptx: str) -> collections.Counter:
    """`ptx_loops`' counts for the kernel's whole row tile (the last), empty when there is none."""
    return (ptx_loops(ptx) or [collections.Counter()])[-1]

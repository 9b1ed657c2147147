"""The numba kernels of the fused CPU selective scan: forward, and the backward that recomputes chunks.

Imported only by :mod:`lkm_unet.ops.selective_scan_numba` (numba is imported here, at module level, so
``import lkm_unet`` never imports it). Compiled on first use and cached on disk (``cache=True``).

Layout: one parallel job is a batch row and a block of :data:`LANES` channels. The block's state
``h: (n, LANES)`` lives in a local array and every innermost loop runs over the channel lanes with unit
stride and a constant trip count, so that one step's exponentials and multiply-adds are whole SIMD
vectors with no reduction across lanes (``B`` and ``C`` are the same for every channel: one broadcast
per state index). ``A`` comes in transposed, ``(n, d)``, the kept states as ``(b, chunks - 1, n, d)``: the
state entering every chunk but the first (which enters with the zero state).
Channels past ``d`` in the last block are padded lanes with ``u = A = 0``: their state stays 0.
The ``(b, d, l)`` inputs and outputs move to and from time-major ``(chunk, LANES)`` tiles as
:data:`BLOCK` x :data:`BLOCK` squares (:func:`transpose_block`: whole-vector loads and stores around a
shuffle network); moved one element at a time, they took a third of the forward's time.

Exponentials: a scalar libm ``exp`` per ``(b, d, l, n)`` element does not vectorise and costs as much as
the rest of the kernel several times over, so fp32 uses :func:`exp_poly`, a Cody-Waite range reduction
and a degree-5 polynomial (about 2 ulp) written with plain arithmetic and a bit cast, which LLVM
vectorises over the lanes. fp64 uses ``math.exp`` (fp64 is for checks, not speed).

Denormals: a decaying state passes through the denormal range (below 1.2e-38 in fp32), where every
x86 multiply takes a slow microcode path. Each ``prange`` iteration therefore turns on flush-to-zero and
denormals-are-zero in its own thread's MXCSR on entry (:func:`denormals_off`) and puts the thread's mode
back on exit (:func:`restore_fp_mode`), so the steps' arithmetic needs no flush of its own and the
process's floating-point mode is the same after the call as before. Other architectures get no mode
change (AArch64 cores process denormals in hardware; not measured here).
"""
from __future__ import annotations

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Channels per job and SIMD loop: 32 fp32 lanes are four AVX2 (two AVX-512) vectors per state index.
# Measured forward ns per b d l n element, 2 threads, against 16 and 64 lanes: 32 is within 20% of the
# best at every shape of docs/benchmarks.md, while 64 leaves a core idle at (1, 64, l).
LANES = 32
# The side of the squares :func:`transpose_block` moves between (channel, time) rows and time-major tiles:
# 16 fp32 are one AVX-512 vector (two AVX2 ones); LANES is a multiple of it.
BLOCK = 16
# MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) flags; set only where the CPU has them
_FTZ_DAZ = 0x8040
_X86 = platform.machine().lower() in ("x86_64", "amd64", "x86", "i686")
# exp(r) = 1 + r + r^2 p(r) on |r| <= ln(2) / 2 with a cubic p, highest power first, fitted to the least
# maximum relative error of exp (iteratively reweighted least squares; 1.1e-7 in exact arithmetic).
# exp_poly's measured relative error: 2.0e-7 for |x| < 20, 3.9e-7 on all of [-86, 88] (the range
# reduction's error grows with |x|), about 2 ulp like mamba-ssm's fast-math __expf. Cephes' quintic p
# (1.2e-7 and 3.0e-7) costs two multiply-adds more per element, 4-9% of the scan's fwd+bwd time.
_P = (8.312505669891834e-3, 4.189007729291916e-2, 1.6667114198207855e-1, 4.99992311000824e-1)


@intrinsic
def _int32_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _mxcsr(builder, name, slot):
    """Call ``llvm.x86.sse.stmxcsr`` or ``ldmxcsr`` on the 32-bit ``slot``."""
    fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()]))
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def denormals_off(typingctx):
    """Turn on flush-to-zero and denormals-are-zero in this thread; returns the mode to restore (0 and no
    change off x86)."""
    sig = types.int32()

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(32), 0)
        slot = builder.alloca(ir.IntType(32))
        _mxcsr(builder, "llvm.x86.sse.stmxcsr", slot)
        mode = builder.load(slot)
        builder.store(builder.or_(mode, ir.Constant(ir.IntType(32), _FTZ_DAZ)), slot)
        _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return mode

    return sig, codegen


@intrinsic
def restore_fp_mode(typingctx, mode):
    """Put back the mode :func:`denormals_off` returned."""
    sig = types.void(types.int32)

    def codegen(context, builder, signature, args):
        if _X86:
            slot = builder.alloca(ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return sig, codegen


def _butterfly_masks(bit: int) -> tuple[list[int], list[int]]:
    """Shuffle masks that swap index bit ``bit`` between a pair of rows ``(i, i + bit)`` and their
    columns: elements ``j`` of the result pick from the first row (``j < BLOCK``) or the second
    (``BLOCK + j``)."""
    first = [j if j & bit == 0 else BLOCK + j - bit for j in range(BLOCK)]
    second = [j + bit if j & bit == 0 else BLOCK + j for j in range(BLOCK)]
    return first, second


@intrinsic
def transpose_block(typingctx, src, src_start, src_stride, dst, dst_start, dst_stride):
    """``dst.flat[dst_start + j dst_stride + i] = src.flat[src_start + i src_stride + j]`` for ``i, j <
    BLOCK``: a square moved across the two layouts, its rows loaded and stored as whole vectors.

    The transpose in between is the butterfly of ``log2(BLOCK)`` stages, each swapping one bit of the row
    index with the same bit of the column index by ``BLOCK`` two-row shuffles. Both arrays must be
    C-contiguous, of one dtype; the caller keeps the square inside them (no bounds check).
    """
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
            and src.layout == "C" and dst.layout == "C"):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(context.get_data_type(signature.args[0].dtype), BLOCK)

        def row(array_type, array, start, stride, i):
            data = context.make_array(array_type)(context, builder, array).data
            offset = builder.add(start, builder.mul(stride, ir.Constant(stride.type, i)))
            return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())

        rows = [builder.load(row(signature.args[0], args[0], args[1], args[2], i), align=1) for i in range(BLOCK)]
        bit = 1
        while bit < BLOCK:
            masks = [ir.Constant(ir.VectorType(ir.IntType(32), BLOCK), m) for m in _butterfly_masks(bit)]
            for i in range(BLOCK):
                if i & bit == 0:
                    pair = rows[i], rows[i + bit]
                    rows[i], rows[i + bit] = (builder.shuffle_vector(*pair, m) for m in masks)
            bit *= 2
        for j in range(BLOCK):
            builder.store(rows[j], row(signature.args[3], args[3], args[4], args[5], j), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", fastmath=True)
def exp_poly(x):
    """exp(x) for fp32 x, branch-free so that a loop of it vectorises. x is clamped to [-86, 88]: the
    result stays a normal number (exp(-86) ~ 4e-38; exp(89) would overflow)."""
    x = max(min(x, np.float32(88.0)), np.float32(-86.0))
    k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))  # x = k ln2 + r, |r| <= ln2 / 2
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)  # ln2 in two parts
    p = np.float32(_P[0])
    p = p * r + np.float32(_P[1])
    p = p * r + np.float32(_P[2])
    p = p * r + np.float32(_P[3])
    e = r * r * p + r + np.float32(1.0)
    return e * _int32_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # e * 2^k


def exp_any(x):
    """exp(x) in the scan's dtype; replaced per dtype below (numba overload)."""


@overload(exp_any, inline="always", fastmath=True)
def _exp_any_impl(x):
    if x == types.float32:
        return lambda x: exp_poly(x)
    return lambda x: math.exp(x)


@njit(inline="always", fastmath=True)
def sigmoid(x, one):
    return one / (one + exp_any(-x))


@njit(inline="always", fastmath=True)
def log1p_unit(e):
    """log(1 + e) for fp32 ``e`` in [0, 1], branch-free: ``2 atanh(s)`` with ``s = e / (2 + e) <= 1/3``, the
    odd series to ``s^13`` (truncation below 2e-8 relative)."""
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(1 / 13)
    p = p * s2 + np.float32(1 / 11)
    p = p * s2 + np.float32(1 / 9)
    p = p * s2 + np.float32(1 / 7)
    p = p * s2 + np.float32(1 / 5)
    p = p * s2 + np.float32(1 / 3)
    return np.float32(2.0) * s * (p * s2 + np.float32(1.0))


def softplus(x):
    """log(1 + exp(x)) in the scan's dtype; replaced per dtype below (numba overload)."""


@overload(softplus, inline="always", fastmath=True)
def _softplus_impl(x):
    # max(x, 0) + log1p(exp(-|x|)): exact for large |x| (torch's softplus returns x above 20, the same in fp32)
    if x == types.float32:
        return lambda x: max(x, np.float32(0.0)) + log1p_unit(exp_poly(-abs(x)))
    return lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def softplus_grad(x, one):
    """``(softplus(x), sigmoid(x))`` in the scan's dtype from one exponential ``e = exp(-|x|)``:
    ``sigmoid(x) = 1 / (1 + e)`` for ``x >= 0``, ``e / (1 + e)`` below; replaced per dtype below."""


@overload(softplus_grad, inline="always", fastmath=True)
def _softplus_grad_impl(x, one):
    if x == types.float32:
        def impl(x, one):
            e = exp_poly(-abs(x))
            return max(x, np.float32(0.0)) + log1p_unit(e), (one if x >= 0 else e) / (one + e)
        return impl

    def impl64(x, one):
        e = math.exp(-abs(x))
        return max(x, 0.0) + math.log1p(e), (one if x >= 0 else e) / (one + e)
    return impl64


@njit(inline="always", fastmath=True)
def _delta_tile(tile, bias_blk, steps, apply_softplus):
    """In place, over a gathered delta tile: ``+ delta_bias``, then the softplus if asked."""
    for j in range(steps):
        for w in range(LANES):
            raw = tile[j, w] + bias_blk[w]
            tile[j, w] = softplus(raw) if apply_softplus else raw


@njit(inline="always")
def _block(job, n_blocks, dim):
    """(batch row, first channel, channels) of parallel job ``job``."""
    bi, blk = job // n_blocks, job % n_blocks
    d0 = blk * LANES
    return bi, d0, min(LANES, dim - d0)


@njit(inline="always")
def _tile(chunk, dtype):
    """A zeroed time-major ``(chunk, LANES)`` tile."""
    return np.zeros((chunk, LANES), dtype=dtype)


@njit
def _clear(*arrays):
    """Zero every array given (``(chunk, LANES)`` tiles or ``(n, LANES)`` buffers)."""
    for x in arrays:
        x[:] = 0


@njit(inline="always")
def _load_block(At, D, bias, d0, width, a_blk, d_blk, bias_blk):
    """A block's ``A``, ``D`` and bias lanes from channel ``d0``; lanes past ``width`` are padding, 0."""
    a_blk[:] = 0
    d_blk[:] = 0
    bias_blk[:] = 0
    a_blk[:, :width] = At[:, d0:d0 + width]
    d_blk[:width] = D[d0:d0 + width]
    bias_blk[:width] = bias[d0:d0 + width]


@njit(inline="always")
def _gather(src, bi, d0, width, t0, steps, tile):
    """``tile[j, w] = src[bi, d0 + w, t0 + j]``: a chunk of ``width`` channel rows into a time-major tile
    (lanes past ``width`` keep their zeros). A full block moves as :data:`BLOCK` x :data:`BLOCK` squares
    through :func:`transpose_block`; the steps past the last whole square, and a partial block, move one
    element at a time."""
    whole = steps - steps % BLOCK if width == LANES else 0
    dim, length = src.shape[1], src.shape[2]
    for j0 in range(0, whole, BLOCK):
        for w0 in range(0, LANES, BLOCK):
            transpose_block(src, (bi * dim + d0 + w0) * length + t0 + j0, length, tile, j0 * LANES + w0, LANES)
    for j in range(whole, steps):
        for w in range(width):
            tile[j, w] = src[bi, d0 + w, t0 + j]


@njit(inline="always")
def _scatter(tile, bi, d0, width, t0, steps, dst):
    """The inverse of :func:`_gather`: ``dst[bi, d0 + w, t0 + j] = tile[j, w]``, by squares likewise."""
    whole = steps - steps % BLOCK if width == LANES else 0
    dim, length = dst.shape[1], dst.shape[2]
    for j0 in range(0, whole, BLOCK):
        for w0 in range(0, LANES, BLOCK):
            transpose_block(tile, j0 * LANES + w0, LANES, dst, (bi * dim + d0 + w0) * length + t0 + j0, length)
    for j in range(whole, steps):
        for w in range(width):
            dst[bi, d0 + w, t0 + j] = tile[j, w]


@njit(parallel=True, cache=True)
def swap_last_axes(src, dst):
    """``dst[b, j, i] = src[b, i, j]`` for C-contiguous ``src: (b, r, c)`` and ``dst: (b, c, r)``: ``B`` and
    ``C`` into the kernels' ``(b, l, n)`` layout and ``dB``, ``dC`` back, as :data:`BLOCK` x :data:`BLOCK`
    squares (:func:`transpose_block`), with the rows and columns past the last whole square one element
    at a time. Parallel over (batch row, band of :data:`BLOCK` source rows, column square)."""
    batch, rows, cols = src.shape
    bands, squares = (rows + BLOCK - 1) // BLOCK, (cols + BLOCK - 1) // BLOCK
    for job in prange(batch * bands * squares):
        bi, rest = job // (bands * squares), job % (bands * squares)
        i0, j0 = (rest // squares) * BLOCK, (rest % squares) * BLOCK
        if i0 + BLOCK <= rows and j0 + BLOCK <= cols:
            transpose_block(src, (bi * rows + i0) * cols + j0, cols, dst, (bi * cols + j0) * rows + i0, rows)
        else:
            for i in range(i0, min(i0 + BLOCK, rows)):
                for j in range(j0, min(j0 + BLOCK, cols)):
                    dst[bi, j, i] = src[bi, i, j]


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def scan_fwd_kernel(delta, bias, apply_softplus, u, z, At, Bt, Ct, D, consts, out, states, chunk, threads):
    """``out = (<C_t, h_t> + D u_t) silu(z_t)`` and ``states[b, c - 1, :, d] = h`` entering chunk ``c >= 1``.

    ``dt = softplus(delta + bias)`` (``apply_softplus``) or ``delta + bias`` is formed per tile, so no
    ``(b, d, l)`` array of it exists. ``delta, u, z, out: (b, d, l)`` (``z`` with a last axis of size 0 when
    there is no gate), ``bias: (d,)``, ``At: (n, d)``,
    ``Bt, Ct: (b, l, n)``, ``D: (d,)``, ``states: (b, ceil(l / chunk) - 1, n, d)`` (size 0 on the chunk axis to
    keep none), ``consts = (0, 1)`` (typed constants: a Python literal would promote fp32
    arithmetic to fp64). Per chunk, the inputs are gathered into time-major ``(chunk, LANES)`` tiles, the
    steps run on the tiles, and the output tile is scattered back. The ``batch * blocks`` jobs run as
    ``threads`` contiguous runs (numba's thread count), one per ``prange`` iteration, and each run makes its
    buffers once: made per job, their allocation and zeroing cost as much as a short job's steps.
    """
    batch, dim, length = u.shape
    n = At.shape[0]
    n_blocks = (dim + LANES - 1) // LANES
    keep = states.shape[1] > 0
    gated = z.shape[2] > 0
    zero, one = consts[0], consts[1]
    jobs = batch * n_blocks
    workers = max(min(threads, jobs), 1)
    for worker in prange(workers):  # one contiguous run of jobs per thread, with its buffers made once
        fp_mode = denormals_off()
        h = np.zeros((n, LANES), dtype=u.dtype)
        a_blk = np.zeros((n, LANES), dtype=u.dtype)
        d_blk = np.zeros(LANES, dtype=u.dtype)
        bias_blk = np.zeros(LANES, dtype=u.dtype)
        dt_t, u_t, z_t, y_t = _tile(chunk, u.dtype), _tile(chunk, u.dtype), _tile(chunk, u.dtype), _tile(chunk, u.dtype)
        dtv, dtu, acc = np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype)
        for job in range(worker * jobs // workers, (worker + 1) * jobs // workers):
            bi, d0, width = _block(job, n_blocks, dim)
            h[:] = zero
            _load_block(At, D, bias, d0, width, a_blk, d_blk, bias_blk)
            if width < LANES:  # a partial block after full ones: its padding lanes must read u = 0 again
                _clear(dt_t, u_t, z_t, y_t)
            for t0 in range(0, length, chunk):
                steps = min(length - t0, chunk)
                if keep and t0 > 0:
                    states[bi, t0 // chunk - 1, :, d0:d0 + width] = h[:, :width]
                _gather(delta, bi, d0, width, t0, steps, dt_t)
                _delta_tile(dt_t, bias_blk, steps, apply_softplus)
                _gather(u, bi, d0, width, t0, steps, u_t)
                for j in range(steps):
                    t = t0 + j
                    for w in range(LANES):
                        dtv[w] = dt_t[j, w]
                        dtu[w] = dt_t[j, w] * u_t[j, w]
                        acc[w] = d_blk[w] * u_t[j, w]
                    for k in range(n):
                        bk = Bt[bi, t, k]
                        ck = Ct[bi, t, k]
                        for w in range(LANES):
                            hk = exp_any(dtv[w] * a_blk[k, w]) * h[k, w] + dtu[w] * bk
                            h[k, w] = hk
                            acc[w] += hk * ck
                    y_t[j, :] = acc
                if gated:
                    _gather(z, bi, d0, width, t0, steps, z_t)
                    for j in range(steps):
                        for w in range(LANES):
                            y_t[j, w] *= z_t[j, w] * sigmoid(z_t[j, w], one)
                _scatter(y_t, bi, d0, width, t0, steps, out)
        restore_fp_mode(fp_mode)


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def scan_bwd_kernel(delta, bias, apply_softplus, u, z, At, Bt, Ct, D, dout, states, consts, chunk,
                    du, ddt, dz, dA, dD, ddelta_bias, dB, dC, threads):
    """Adjoint of :func:`scan_fwd_kernel`, recomputing each chunk's states from ``states``.

    Inputs as the forward, plus ``dout: (b, d, l)``. Writes ``du, ddt, dz: (b, d, l)`` (``ddt`` w.r.t.
    ``delta``, through the softplus), per-batch-row partial sums ``dA: (b, n, d)``,
    ``dD, ddelta_bias: (b, d)``, and per-block sums ``dB, dC: (blocks, b, l, n)``: job (row, block) writes
    its own slice only, so the jobs run in parallel without races. With ``dy = dout silu(z)``, ``g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}`` and
    ``x_t = g_t a_t h_{t-1}``: ``du = dt sum_n g B + D dy``, ``ddt = u sum_n g B + sum_n x A``,
    ``dB_t = sum_d g dt u``, ``dC_t = sum_d h dy``, ``dA = sum_t x dt``. Tiles and runs of jobs as in
    the forward.
    """
    batch, dim, length = u.shape
    n = At.shape[0]
    n_chunks = (length + chunk - 1) // chunk
    n_blocks = (dim + LANES - 1) // LANES
    gated = z.shape[2] > 0
    zero, one = consts[0], consts[1]
    jobs = batch * n_blocks
    workers = max(min(threads, jobs), 1)
    for worker in prange(workers):  # one contiguous run of jobs per thread, with its buffers made once
        fp_mode = denormals_off()
        hist = np.zeros((chunk + 1, n, LANES), dtype=u.dtype)  # h entering the chunk, then h_t per step
        decays = np.zeros((chunk, n, LANES), dtype=u.dtype)
        a_blk = np.zeros((n, LANES), dtype=u.dtype)
        d_blk = np.zeros(LANES, dtype=u.dtype)
        bias_blk = np.zeros(LANES, dtype=u.dtype)
        ga = np.zeros((n, LANES), dtype=u.dtype)  # a_{t+1} g_{t+1}, carried backwards across chunks
        da = np.zeros((n, LANES), dtype=u.dtype)
        dd_acc = np.zeros(LANES, dtype=u.dtype)
        dbias_acc = np.zeros(LANES, dtype=u.dtype)
        # one step's lanes: dt, dt u, dout silu(z), and two sums over the state index
        dtv, dtu, dyv = np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype)
        acc, acc2 = np.zeros(LANES, dtype=u.dtype), np.zeros(LANES, dtype=u.dtype)
        # (chunk, LANES) tiles: inputs (raw_t: delta + bias, then the softplus's derivative there), then dt u,
        # dout silu(z) and sigmoid(z), the pre-gate y, sum_n g B, sum_n x A, and the output gradients
        dt_t, u_t, z_t = _tile(chunk, u.dtype), _tile(chunk, u.dtype), _tile(chunk, u.dtype)
        raw_t, dout_t, dtu_t = _tile(chunk, u.dtype), _tile(chunk, u.dtype), _tile(chunk, u.dtype)
        dy_t, zs_t, y_t = _tile(chunk, u.dtype), _tile(chunk, u.dtype), _tile(chunk, u.dtype)
        sb_t, sa_t = _tile(chunk, u.dtype), _tile(chunk, u.dtype)
        for job in range(worker * jobs // workers, (worker + 1) * jobs // workers):
            bi, d0, width = _block(job, n_blocks, dim)
            blk = job % n_blocks
            _clear(ga, da)
            dd_acc[:] = zero
            dbias_acc[:] = zero
            _load_block(At, D, bias, d0, width, a_blk, d_blk, bias_blk)
            if width < LANES:  # a partial block after full ones: its padding lanes must read u = dout = 0 again
                _clear(dt_t, u_t, z_t, raw_t, dout_t, dtu_t, dy_t, zs_t, y_t, sb_t, sa_t)
                hist[0] = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                steps = min(length, t0 + chunk) - t0
                _gather(delta, bi, d0, width, t0, steps, raw_t)
                _delta_tile(raw_t, bias_blk, steps, False)  # delta + bias: the softplus's argument
                if apply_softplus:  # dt, and in raw_t the softplus's derivative sigmoid(delta + bias)
                    for j in range(steps):
                        for w in range(LANES):
                            dt_t[j, w], raw_t[j, w] = softplus_grad(raw_t[j, w], one)
                else:
                    dt_t[:steps] = raw_t[:steps]
                _gather(u, bi, d0, width, t0, steps, u_t)
                _gather(dout, bi, d0, width, t0, steps, dout_t)
                if gated:
                    _gather(z, bi, d0, width, t0, steps, z_t)
                for j in range(steps):
                    for w in range(LANES):
                        dtu_t[j, w] = dt_t[j, w] * u_t[j, w]
                        if gated:
                            zs_t[j, w] = sigmoid(z_t[j, w], one)
                            dy_t[j, w] = dout_t[j, w] * z_t[j, w] * zs_t[j, w]
                        else:
                            dy_t[j, w] = dout_t[j, w]
                if c > 0:
                    hist[0, :, :width] = states[bi, c - 1, :, d0:d0 + width]
                else:
                    hist[0] = zero
                for j in range(steps):  # recompute the chunk's decays, states and pre-gate output
                    t = t0 + j
                    for w in range(LANES):
                        dtv[w] = dt_t[j, w]
                        dtu[w] = dtu_t[j, w]
                        acc[w] = zero
                    for k in range(n):
                        bk = Bt[bi, t, k]
                        ck = Ct[bi, t, k]
                        for w in range(LANES):
                            a = exp_any(dtv[w] * a_blk[k, w])
                            decays[j, k, w] = a
                            hk = a * hist[j, k, w] + dtu[w] * bk
                            hist[j + 1, k, w] = hk
                            acc[w] += hk * ck
                    y_t[j, :] = acc
                for j in range(steps - 1, -1, -1):  # the adjoint, backwards
                    t = t0 + j
                    for w in range(LANES):
                        dtv[w] = dt_t[j, w]
                        dtu[w] = dtu_t[j, w]
                        dyv[w] = dy_t[j, w]
                        acc[w] = zero
                        acc2[w] = zero
                    for k in range(n):
                        bk = Bt[bi, t, k]
                        ck = Ct[bi, t, k]
                        db = zero
                        dc = zero
                        for w in range(LANES):
                            gk = ga[k, w] + ck * dyv[w]
                            dc += hist[j + 1, k, w] * dyv[w]
                            db += gk * dtu[w]
                            acc[w] += gk * bk
                            gak = gk * decays[j, k, w]
                            xk = gak * hist[j, k, w]
                            acc2[w] += xk * a_blk[k, w]
                            da[k, w] += xk * dtv[w]
                            ga[k, w] = gak
                        dB[blk, bi, t, k] = db
                        dC[blk, bi, t, k] = dc
                    sb_t[j, :] = acc
                    sa_t[j, :] = acc2
                for j in range(steps):  # the elementwise epilogue; the tiles are reused for the results
                    for w in range(LANES):
                        uv = u_t[j, w]
                        dy_w = dy_t[j, w]
                        dd_acc[w] += dy_w * uv
                        gdt = uv * sb_t[j, w] + sa_t[j, w]
                        if apply_softplus:
                            gdt *= raw_t[j, w]
                        dbias_acc[w] += gdt
                        if gated:
                            zs = zs_t[j, w]
                            z_t[j, w] = dout_t[j, w] * (y_t[j, w] + d_blk[w] * uv) * zs * (one + z_t[j, w] * (one - zs))
                        u_t[j, w] = dt_t[j, w] * sb_t[j, w] + d_blk[w] * dy_w
                        dt_t[j, w] = gdt
                _scatter(u_t, bi, d0, width, t0, steps, du)
                _scatter(dt_t, bi, d0, width, t0, steps, ddt)
                if gated:
                    _scatter(z_t, bi, d0, width, t0, steps, dz)
            dA[bi, :, d0:d0 + width] = da[:, :width]
            dD[bi, d0:d0 + width] = dd_acc[:width]
            ddelta_bias[bi, d0:d0 + width] = dbias_acc[:width]
        restore_fp_mode(fp_mode)

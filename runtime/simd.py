"""The q8_0-activation block products as LLVM IR on AVX-512 VNNI or AVX2, for numba (docs/design.md §5).

LLVM does not turn numba's loops over the tiles' [k][row][4] bytes into
the CPU's byte dot products (it emits byte gathers), so this module writes
the inner loop as IR, wrapped in numba intrinsics the drivers in
netp.runtime.kernels call. Each 32-bit lane is one row's 4 codes against 4
activation codes broadcast from memory:
- AVX-512 VNNI: one `vpdpbusd` (u8 x s8, four products summed into an s32
  lane) on 16 rows;
- AVX2: `vpmaddubsw` (u8 x s8, pairs summed into s16 lanes) then
  `vpmaddwd` by ones (the pairs into s32 lanes) on 8 rows, as ggml's AVX2
  kernels do. A q4 block's 16 products per lane stay below 2^15
  (16 x 15 x 127) and are summed in s16 first; q8_0 codes go through the
  sign trick (|w| unsigned against x with w's sign), which holds the pairs
  below 2^15 for every int8 code, -128 included.
`ISA` is the best of the two that the CPU numba compiles for has; without
either the kernels run their portable loops.

One call computes, for `groups` consecutive groups of LANES rows of one tile
and `tokens` consecutive activation rows, every block's integer sum and adds
the block's term to an f64 accumulator per row and token, exactly as the
portable loops do (so every path gives the same bits):
  isum = sum(code * x_q) over the block    (q4 codes unsigned 0..15)
  q4_0: term = (d_w d_x) (isum - 8 sum x_q)
  q8_0: term = (d_w d_x) isum               (VNNI: codes + 128, isum - 128 sum x_q)
  q4_1: term = (d_w d_x) isum + m_w (d_x sum x_q)
d_w d_x is exact in f32 and f64 (two f16 values), and each product with an
integer sum below 2^21 is exact in f64, so a fused multiply-add rounds only
where the portable loops' add does. The accumulators start at 0 and take
the blocks in order; the result is stored (not added) to out.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.codegen import get_host_cpu_features
from numba.core import config
from numba.extending import intrinsic

R = 64  # rows per tile, as netp.runtime.kernels lays them out
PACK_ROWS = 16  # rows packed per call (pack_rows)

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32, _f64, _half = ir.FloatType(), ir.DoubleType(), ir.HalfType()


def _features() -> set[str]:
    """The features numba's target machine compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    text = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return {f[1:] for f in (text or "").split(",") if f.startswith("+")}


def _best_isa() -> str | None:
    have = _features()
    if {"avx512vnni", "avx512bw", "avx512f"} <= have:
        return "avx512vnni"
    if {"avx2", "f16c", "fma"} <= have:
        return "avx2"
    return None


_LANES = {"avx512vnni": 16, "avx2": 8}  # rows per vector of s32 lanes
ISA = _best_isa()
LANES = _LANES[ISA] if ISA else 16  # (without either, unused: the kernels never call block_products)
KINDS = ("q4_0", "q4_1", "q8_0")


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(v: int) -> ir.Constant:
    return ir.Constant(_i64, v)


def _splat(b: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    vt = _vec(value.type, n)
    v = b.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_i32, 0))
    return b.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(_i32, n), [0] * n))


def _load(b: ir.IRBuilder, base: ir.Value, offset: ir.Value, t: ir.Type, align: int) -> ir.Value:
    """A value of type t at byte offset `offset` from an i8* base (numpy guarantees no more than
    element alignment, so vectors load unaligned)."""
    return b.load(b.bitcast(b.gep(base, [offset]), t.as_pointer()), align=align)


def _call(b: ir.IRBuilder, name: str, result: ir.Type, args: list[ir.Value]) -> ir.Value:
    fn = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(result, [a.type for a in args]), name)
    return b.call(fn, args)


def _dpbusd(b: ir.IRBuilder, acc: ir.Value, codes: ir.Value, x: ir.Value) -> ir.Value:
    v16 = _vec(_i32, 16)
    return _call(b, "llvm.x86.avx512.vpdpbusd.512", v16, [acc, b.bitcast(codes, v16), b.bitcast(x, v16)])


def _maddubs(b: ir.IRBuilder, codes: ir.Value, x: ir.Value) -> ir.Value:
    """s16 lanes: pairs of u8 codes x s8 x summed (vpmaddubsw)."""
    return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vec(_i16, 16), [codes, x])


def _pairs_to_s32(b: ir.IRBuilder, s16: ir.Value) -> ir.Value:
    """s32 lanes: adjacent s16 lanes summed (vpmaddwd by ones)."""
    return _call(b, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [s16, ir.Constant(_vec(_i16, 16), [1] * 16)])


def _sign(b: ir.IRBuilder, a: ir.Value, s: ir.Value) -> ir.Value:
    """a negated where s < 0, zeroed where s == 0, per byte (vpsignb)."""
    return _call(b, "llvm.x86.avx2.psign.b", a.type, [a, s])


def _fma(b: ir.IRBuilder, a: ir.Value, c: ir.Value, acc: ir.Value) -> ir.Value:
    n = a.type.count
    return _call(b, f"llvm.fma.v{n}f64", _vec(_f64, n), [a, c, acc])


def _tree_sum(b: ir.IRBuilder, values: list[ir.Value]) -> ir.Value:
    """The values added pairwise (independent adds, not one chain)."""
    while len(values) > 1:
        values = [b.add(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    return values[0]


def _block_sums(b: ir.IRBuilder, isa: str, kind: str, lanes: int, codes: list[list[ir.Value]],
                xword: dict[tuple[int, int], ir.Value]) -> list[list[ir.Value]]:
    """One block's s32 integer sums per (group, token): codes[k][g] the group's k-th code words,
    xword[t, w] token t's w-th 4 activation codes broadcast to every lane."""
    groups, tokens = len(codes[0]), 1 + max(t for t, _ in xword)
    v8 = _vec(_i8, 4 * lanes)
    low4, shift4 = ir.Constant(v8, [15] * 4 * lanes), ir.Constant(v8, [4] * 4 * lanes)
    sums = [[None] * tokens for _ in range(groups)]
    for g in range(groups):
        for t in range(tokens):
            if isa == "avx512vnni":  # two independent chains: q4's low / high nibbles, q8's even / odd words
                zero = ir.Constant(_vec(_i32, lanes), [0] * lanes)
                s = [zero, zero]
                for k, row in enumerate(codes):
                    if kind == "q8_0":
                        s[k % 2] = _dpbusd(b, s[k % 2], row[g], xword[t, k])
                    else:
                        s[0] = _dpbusd(b, s[0], b.and_(row[g], low4), xword[t, k])
                        s[1] = _dpbusd(b, s[1], b.and_(b.lshr(row[g], shift4), low4), xword[t, k + 4])
                sums[g][t] = b.add(*s)
            elif kind == "q8_0":  # |w| x (x with w's sign): pairs <= 2 x 128 x 127 < 2^15
                s = []
                for k, row in enumerate(codes):
                    w = b.xor(row[g], ir.Constant(v8, [0x80] * 4 * lanes))  # the stored code + 128 -> the code
                    s.append(_pairs_to_s32(b, _maddubs(b, _sign(b, w, w), _sign(b, xword[t, k], w))))
                sums[g][t] = _tree_sum(b, s)
            else:  # q4: 16 products per s16 lane, |sum| <= 16 x 15 x 127 < 2^15
                lo = [_maddubs(b, b.and_(row[g], low4), xword[t, k]) for k, row in enumerate(codes)]
                hi = [_maddubs(b, b.and_(b.lshr(row[g], shift4), low4), xword[t, k + 4])
                      for k, row in enumerate(codes)]
                sums[g][t] = _pairs_to_s32(b, _tree_sum(b, lo + hi))
    return sums


def _out_offsets(b: ir.IRBuilder, tile: ir.Value, g0: ir.Value, t0: ir.Value, width: ir.Value, lanes: int,
                 groups: int, tokens: int) -> list[list[ir.Value]]:
    """Index in out (f64) of each (group, token)'s first row."""
    return [[b.add(b.mul(b.add(t0, _const(t)), width),
                   b.add(b.mul(tile, _const(R)), b.mul(b.add(g0, _const(g)), _const(lanes)))) for t in range(tokens)]
            for g in range(groups)]


def _emit(module: ir.Module, isa: str, kind: str, groups: int, tokens: int) -> ir.Function:
    """void f(qs, d, m, xq, xd, xs, out: i8*; tile, g0, t0, b0, b1, nb, width: i64): the rows of groups
    g0 .. g0+groups-1 (of LANES rows) of `tile` against activation rows t0 .. t0+tokens-1 (layouts:
    kernels.py), over blocks b0 .. b1-1 of the nb: from 0 when b0 = 0, else continuing the sums out holds
    (the same f64 operations in the same order as one pass over every block)."""
    name = f"netp_{isa}_{kind}_g{groups}_t{tokens}"
    if name in module.globals:
        return module.globals[name]
    lanes = _LANES[isa]
    k_words = 8 if kind == "q8_0" else 4  # 32-bit words of codes per row and block
    p8 = _i8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [p8] * 7 + [_i64] * 7), name)
    fn.linkage = "internal"
    qs, d, m, xq, xd, xs, out, tile, g0, t0, b0, b1, nb, width = fn.args
    entry, body, done = fn.append_basic_block("entry"), fn.append_basic_block("body"), \
        fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    v8, vf64 = _vec(_i8, 4 * lanes), _vec(_f64, lanes)
    out64 = b.bitcast(out, _f64.as_pointer())
    at = _out_offsets(b, tile, g0, t0, width, lanes, groups, tokens)
    first = b.icmp_signed("==", b0, _const(0))
    start = [[b.select(first, ir.Constant(vf64, [0.0] * lanes),
                       b.load(b.bitcast(b.gep(out64, [at[g][t]]), vf64.as_pointer()), align=8))
              for t in range(tokens)] for g in range(groups)]
    b.branch(body)

    b.position_at_end(body)
    blk = b.phi(_i64)
    blk.add_incoming(b0, entry)
    acc = [[b.phi(vf64) for _ in range(tokens)] for _ in range(groups)]
    for g in range(groups):
        for t in range(tokens):
            acc[g][t].add_incoming(start[g][t], entry)
    tb = b.add(b.mul(tile, nb), blk)  # (tile, block) index
    qbase = b.mul(tb, _const(k_words * R * 4))
    sidx = [b.add(b.mul(b.add(t0, _const(t)), nb), blk) for t in range(tokens)]  # (token, block) index
    xword = {}  # (token, word) -> 4 activation codes broadcast to every lane
    for t in range(tokens):
        for w in range(8):
            word = _load(b, xq, b.add(b.mul(sidx[t], _const(32)), _const(4 * w)), _i32, 4)
            xword[t, w] = b.bitcast(_splat(b, word, lanes), v8)
    codes = [[_load(b, qs, b.add(qbase, b.add(_const(k * R * 4), b.mul(b.add(g0, _const(g)), _const(lanes * 4)))),
                    v8, 1) for g in range(groups)] for k in range(k_words)]
    isum = _block_sums(b, isa, kind, lanes, codes, xword)
    code_offset = {"q4_0": 8, "q4_1": 0, "q8_0": 128 if isa == "avx512vnni" else 0}[kind]
    new = [[None] * tokens for _ in range(groups)]
    for g in range(groups):
        soff = b.mul(b.add(b.mul(tb, _const(R)), b.mul(b.add(g0, _const(g)), _const(lanes))), _const(2))
        dw = b.fpext(b.bitcast(_load(b, d, soff, _vec(_i16, lanes), 2), _vec(_half, lanes)), vf64)
        if kind == "q4_1":
            mw = b.fpext(b.bitcast(_load(b, m, soff, _vec(_i16, lanes), 2), _vec(_half, lanes)), vf64)
        for t in range(tokens):
            dx = b.fpext(_load(b, xd, b.mul(sidx[t], _const(4)), _f32, 4), _f64)
            sx = _load(b, xs, b.mul(sidx[t], _const(4)), _i32, 4)
            total = isum[g][t]
            scale = b.fmul(dw, _splat(b, dx, lanes))
            if kind == "q4_1":  # acc + (d_w d_x isum + m_w (d_x sum x_q)), the portable loops' order
                mterm = b.fmul(mw, _splat(b, b.fmul(dx, b.sitofp(sx, _f64)), lanes))
                new[g][t] = b.fadd(acc[g][t], _fma(b, scale, b.sitofp(total, vf64), mterm))
            else:
                if code_offset:
                    total = b.sub(total, _splat(b, b.mul(sx, ir.Constant(_i32, code_offset)), lanes))
                new[g][t] = _fma(b, scale, b.sitofp(total, vf64), acc[g][t])
    nxt = b.add(blk, _const(1))
    here = b.block
    blk.add_incoming(nxt, here)
    for g in range(groups):
        for t in range(tokens):
            acc[g][t].add_incoming(new[g][t], here)
    b.cbranch(b.icmp_signed("<", nxt, b1), body, done)

    b.position_at_end(done)
    for g in range(groups):
        for t in range(tokens):
            b.store(new[g][t], b.bitcast(b.gep(out64, [at[g][t]]), vf64.as_pointer()), align=8)
    b.ret_void()
    return fn


def block_products(kind: str, groups: int, tokens: int):
    """A numba intrinsic f(qs, d, m, xq, xd, xs, out, tile, g0, t0, b0, b1) running `_emit`'s function for ISA:
    qs (tiles, blocks, words, R) uint32, d / m (tiles, blocks, R) uint16 (f16 bits; m unused
    but for q4_1), xq (T, blocks, 32) int8, xd (T, blocks) f32, xs (T, blocks) int32,
    out (T, >= tiles x R) f64, all C-contiguous. Only compiled (called) where ISA is not None."""
    if kind not in KINDS:
        raise ValueError(kind)

    @intrinsic
    def call(typingctx, qs, d, m, xq, xd, xs, out, tile, g0, t0, b0, b1):
        sig = types.void(qs, d, m, xq, xd, xs, out, *[types.int64] * 5)

        def codegen(context, builder, signature, args):
            assert ISA is not None  # (the kernels call these only where it is)
            arrays = [context.make_array(ty)(context, builder, a) for ty, a in zip(signature.args[:7], args[:7])]
            pointers = [builder.bitcast(a.data, _i8.as_pointer()) for a in arrays]
            nb = cgutils.unpack_tuple(builder, arrays[4].shape, 2)[1]
            width = cgutils.unpack_tuple(builder, arrays[6].shape, 2)[1]
            ints = [context.cast(builder, v, ty, types.int64) for v, ty in zip(args[7:], signature.args[7:])]
            builder.call(_emit(builder.module, ISA, kind, groups, tokens), pointers + ints + [nb, width])
            return context.get_dummy_value()

        return sig, codegen

    return call


# -- packing: 16 file rows' blocks into the tiles' [word][row] order -------------------------------

def _emit_pack(module: ir.Module, words: int, heads: int, flip: bool) -> ir.Function:
    """void f(src: i8*, row_bytes, qs: i8*, d: i8*, m: i8*, tile, group, nb: i64): rows
    16 group .. 16 group + 15 of `tile`, read from src (the first of them at src), into the tiles."""
    name = f"netp_pack_w{words}_h{heads}{'_flip' if flip else ''}"
    if name in module.globals:
        return module.globals[name]
    p8 = _i8.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [p8, _i64, p8, p8, p8, _i64, _i64, _i64]), name)
    fn.linkage = "internal"
    src, row_bytes, qs, d, m, tile, group, nb = fn.args
    entry, body, done = fn.append_basic_block("entry"), fn.append_basic_block("body"), \
        fn.append_basic_block("done")
    b = ir.IRBuilder(entry)
    b.branch(body)
    b.position_at_end(body)
    blk = b.phi(_i64)
    blk.add_incoming(_const(0), entry)
    block_bytes = 2 * heads + 4 * words
    rows = []
    scales: list[list[ir.Value]] = [[] for _ in range(heads)]
    for r in range(PACK_ROWS):
        at = b.add(b.mul(_const(r), row_bytes), b.mul(blk, _const(block_bytes)))
        rows.append(_load(b, src, b.add(at, _const(2 * heads)), _vec(_i32, words), 1))
        for h in range(heads):
            scales[h].append(_load(b, src, b.add(at, _const(2 * h)), _i16, 1))
    while len(rows) > 1:  # concatenate: row-major [row][word]
        n = rows[0].type.count
        rows = [b.shuffle_vector(rows[i], rows[i + 1], ir.Constant(_vec(_i32, 2 * n), list(range(2 * n))))
                for i in range(0, len(rows), 2)]
    allw = rows[0]
    order = [r * words + w for w in range(words) for r in range(PACK_ROWS)]  # -> [word][row]
    allw = b.shuffle_vector(allw, ir.Constant(allw.type, ir.Undefined), ir.Constant(_vec(_i32, len(order)), order))
    if flip:
        allw = b.xor(allw, ir.Constant(allw.type, [0x80808080] * len(order)))
    tb = b.add(b.mul(tile, nb), blk)
    for w in range(words):
        part = b.shuffle_vector(allw, ir.Constant(allw.type, ir.Undefined),
                                ir.Constant(_vec(_i32, PACK_ROWS), list(range(w * PACK_ROWS, (w + 1) * PACK_ROWS))))
        off = b.add(b.mul(tb, _const(words * R * 4)), b.add(_const(w * R * 4), b.mul(group, _const(PACK_ROWS * 4))))
        b.store(part, b.bitcast(b.gep(qs, [off]), _vec(_i32, PACK_ROWS).as_pointer()), align=1)
    for h, out in enumerate((d, m)[:heads]):
        v = ir.Constant(_vec(_i16, PACK_ROWS), ir.Undefined)
        for r in range(PACK_ROWS):
            v = b.insert_element(v, scales[h][r], ir.Constant(_i32, r))
        off = b.mul(b.add(b.mul(tb, _const(R)), b.mul(group, _const(PACK_ROWS))), _const(2))
        b.store(v, b.bitcast(b.gep(out, [off]), _vec(_i16, PACK_ROWS).as_pointer()), align=1)
    nxt = b.add(blk, _const(1))
    blk.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, nb), body, done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def pack_rows(words: int, heads: int, flip: bool):
    """A numba intrinsic f(src, row, qs, d, m, tile, group): 16 file rows src[row:row + 16] (uint8,
    (rows, bytes)) into group `group` (16 rows) of tile `tile` of qs (tiles, blocks, words, R, 4)
    uint8 and d / m (tiles, blocks, R) uint16. Portable IR (shuffles), no CPU feature needed."""

    @intrinsic
    def call(typingctx, src, row, qs, d, m, tile, group):
        sig = types.void(src, types.int64, qs, d, m, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            s, q, dd, mm = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 4))
            row_bytes = cgutils.unpack_tuple(builder, s.shape, 2)[1]
            nb = cgutils.unpack_tuple(builder, q.shape, 5)[1]
            start = builder.gep(builder.bitcast(s.data, _i8.as_pointer()), [builder.mul(args[1], row_bytes)])
            ptrs = [builder.bitcast(a.data, _i8.as_pointer()) for a in (q, dd, mm)]
            builder.call(_emit_pack(builder.module, words, heads, flip),
                         [start, row_bytes, *ptrs, args[5], args[6], nb])
            return context.get_dummy_value()

        return sig, codegen

    return call

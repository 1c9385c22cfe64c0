"""The interpreter's memory checker (memcheck.py) on small planted kernels: each rule fires on a
kernel that breaks it; clean kernels (masked tails, in-place updates, shared reads and atomics,
strided views) pass."""
import os

import pytest
import torch

import memcheck

triton = pytest.importorskip("triton")
tl = triton.language
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter")


@triton.jit
def _store_block(X, BLOCK: tl.constexpr):
    """Every program stores its id to X[0:BLOCK] (racy with more than one program)."""
    tl.store(X + tl.arange(0, BLOCK), tl.full((BLOCK,), 0, tl.int32) + tl.program_id(0))


@triton.jit
def _shift_left(X):
    """Program i copies X[i + 1] to X[i]: program i + 1 writes what program i reads."""
    i = tl.program_id(0)
    tl.store(X + i, tl.load(X + i + 1))


@triton.jit
def _store_word_or_byte(WORDS, BYTES):
    """Program 0 stores the int32 WORDS[1]; program 1 stores the byte BYTES[5] (same memory)."""
    if tl.program_id(0) == 0:
        tl.store(WORDS + 1, 7)
    else:
        tl.store(BYTES + 5, tl.full((), 1, tl.uint8))


@triton.jit
def _add_then_store(X):
    """Program 0 stores X[0]; the others add to it atomically."""
    if tl.program_id(0) == 0:
        tl.store(X, 1.0)
    else:
        tl.atomic_add(X, 1.0)


@triton.jit
def _add_then_load(X, OUT):
    """Each program adds to X[0] atomically, then reads it back with a plain load."""
    tl.atomic_add(X, 1.0)
    tl.store(OUT + tl.program_id(0), tl.load(X))


@triton.jit
def _copy_unmasked(X, Y, BLOCK: tl.constexpr):
    """Copies BLOCK elements of X to Y without a mask."""
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


@triton.jit
def _swap_zeros(X, BLOCK: tl.constexpr):
    """X[i] = 1 where X[i] == 0, for i < BLOCK, with atomic compare-and-swap (no mask)."""
    tl.atomic_cas(X + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.int32), tl.full((BLOCK,), 1, tl.int32))


@triton.jit
def _copy_strided(X, Y, n, stride, EXTRA: tl.constexpr):
    """Y[i] = X[i * stride + EXTRA] for i < n (EXTRA = 1 steps past a strided view's span)."""
    offs = tl.arange(0, 8)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs * stride + EXTRA * ok, mask=ok), mask=ok)


@triton.jit
def _add(X, Y, OUT, n, BLOCK: tl.constexpr):
    """OUT = X + Y; the tail's masked-out lanes point past the end."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(OUT + offs, tl.load(X + offs, mask=ok) + tl.load(Y + offs, mask=ok), mask=ok)


@triton.jit
def _scale_in_place(X, n, BLOCK: tl.constexpr):
    """X *= 2: each program reads and writes its own block."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(X + offs, tl.load(X + offs, mask=ok) * 2, mask=ok)


@triton.jit
def _histogram(X, COUNTS, n, BLOCK: tl.constexpr):
    """COUNTS[x] += 1 for every x in X: all programs add atomically to the same few counters."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    bins = tl.load(X + offs, mask=ok, other=0)
    tl.atomic_add(COUNTS + bins, tl.full((BLOCK,), 1, tl.int32), mask=ok)


@triton.jit
def _sum_2d(X, PARTIAL, stride):
    """PARTIAL[i, j] = X[i, j] + X[i, j + 1] on a (2, 2) grid: shared reads, private writes."""
    i, j = tl.program_id(0), tl.program_id(1)
    value = tl.load(X + i * stride + j) + tl.load(X + i * stride + j + 1)
    tl.store(PARTIAL + i * 2 + j, value)


@triton.jit
def _gather_rows(TABLE, OUT, BLOCK: tl.constexpr):
    """OUT[i, :BLOCK] = the first BLOCK floats at the address in TABLE[i] (no mask)."""
    i = tl.program_id(0)
    rows = tl.load(TABLE + i).to(tl.pointer_type(tl.float32))
    tl.store(OUT + i * BLOCK + tl.arange(0, BLOCK), tl.load(rows + tl.arange(0, BLOCK)))


@triton.jit
def _store_through(TABLE, BLOCK: tl.constexpr):
    """Program i stores i to BLOCK floats at the address in TABLE[i]."""
    i = tl.program_id(0)
    rows = tl.load(TABLE + i).to(tl.pointer_type(tl.float32))
    tl.store(rows + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32) + i)


def test_two_programs_storing_one_address_race():
    x = torch.zeros(4, dtype=torch.int32)
    _store_block[(1,)](x, BLOCK=4)  # one program: fine
    with pytest.raises(memcheck.Violation, match=r"(?s)_store_block .*write-write race: 16 byte\(s\) stored by two "
                                                 r"programs, e\.g\. X\[0\] at 0x[0-9a-f]+ by programs \(0, 0, 0\) "
                                                 r"and \(1, 0, 0\)"):
        _store_block[(3,)](x, BLOCK=4)


def test_stores_of_different_widths_overlap_bytewise():
    x = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(memcheck.Violation, match=r"write-write race: 1 byte\(s\) .* WORDS\[1\] \+ 1 byte\(s\)"):
        _store_word_or_byte[(2,)](x, x.view(torch.uint8))


def test_reading_what_another_program_writes_races():
    x = torch.arange(5, dtype=torch.float32)
    with pytest.raises(memcheck.Violation, match=r"(?s)_shift_left .*read-write race: 12 byte\(s\) read by one program "
                                                 r"and written by another, e\.g\. X\[1\] .* by programs \(0, 0, 0\) "
                                                 r"and \(1, 0, 0\)"):
        _shift_left[(4,)](x)
    _shift_left[(1,)](x)  # one program reads X[1] and writes X[0]: fine


def test_atomic_and_plain_access_mix_across_programs():
    x = torch.zeros(1)
    with pytest.raises(memcheck.Violation, match=r"atomic/plain mix: 4 byte\(s\) updated atomically and accessed "
                                                 r"plainly, e\.g\. X\[0\] .* by programs \(1, 0, 0\) and \(0, 0, 0\)"):
        _add_then_store[(3,)](x)


def test_atomic_and_plain_access_mix_within_a_program():
    x, out = torch.zeros(1), torch.zeros(2)
    with pytest.raises(memcheck.Violation, match=r"atomic/plain mix: .* by programs \(0, 0, 0\) and \(0, 0, 0\)"):
        _add_then_load[(1,)](x, out)


def test_unmasked_load_past_the_end_is_out_of_bounds():
    x, y = torch.arange(6, dtype=torch.float32), torch.zeros(8)
    with pytest.raises(memcheck.Violation, match=r"(?s)_copy_unmasked .*out of bounds: 2 lane\(s\) outside the tensor "
                                                 r"arguments, e\.g\. load of 4 byte\(s\) at X\[6\] at 0x[0-9a-f]+ "
                                                 r"\(view spans X\[0:6\]\) by program \(0, 0, 0\)"):
        _copy_unmasked[(1,)](x, y, BLOCK=8)
    assert torch.equal(y, torch.cat([x, torch.zeros(2)]))  # the lanes out of bounds loaded `other`


def test_store_past_a_views_end_is_out_of_bounds_and_not_done():
    storage = torch.zeros(16)
    with pytest.raises(memcheck.Violation, match=r"out of bounds: 8 lane\(s\) .* store of 4 byte\(s\) at "
                                                 r"Y\[8\] at 0x[0-9a-f]+ \(view spans Y\[0:8\]\)"):
        _copy_unmasked[(1,)](torch.ones(16), storage[:8], BLOCK=16)
    assert storage[:8].eq(1).all() and storage[8:].eq(0).all()


def test_compare_and_swap_past_the_end_is_out_of_bounds_and_not_done():
    storage = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(memcheck.Violation, match=r"out of bounds: 4 lane\(s\) .* atomic of 4 byte\(s\) at X\[4\]"):
        _swap_zeros[(1,)](storage[:4], BLOCK=8)
    assert storage[:4].eq(1).all() and storage[4:].eq(0).all()


def test_strided_view_span():
    matrix = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    column, y = matrix[:, 1], torch.zeros(8)  # the view spans elements 1 ... 13 of the storage
    _copy_strided[(1,)](column, y, 4, 4, EXTRA=0)
    assert torch.equal(y[:4], column)
    with pytest.raises(memcheck.Violation, match=r"out of bounds: 1 lane\(s\) .* X\[13\] .*view spans X\[0:13\]"):
        _copy_strided[(1,)](column, y, 4, 4, EXTRA=1)


def test_clean_kernels_pass():
    n = 37
    x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
    _add[(triton.cdiv(n, 16),)](x, y, out, n, BLOCK=16)  # masked-out tail lanes point past the end
    assert torch.equal(out, x + y)
    _scale_in_place[(triton.cdiv(n, 16),)](out, n, BLOCK=16)
    assert torch.equal(out, 2 * (x + y))

    values, counts = torch.randint(0, 3, (n,), dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    _histogram[(triton.cdiv(n, 8),)](values, counts, n, BLOCK=8)  # five programs add to each counter
    assert torch.equal(counts, torch.bincount(values, minlength=3).int())

    matrix, partial = torch.randn(2, 3), torch.empty(2, 2)
    _sum_2d[(2, 2)](matrix, partial, matrix.stride(0))  # programs share reads of matrix[:, 1]
    assert torch.equal(partial, matrix[:, :2] + matrix[:, 1:])


def test_allowed_pairs_are_not_reported(monkeypatch):
    x = torch.zeros(4, dtype=torch.int32)
    monkeypatch.setattr(memcheck, "allowed", {("_store_block", memcheck.WRITE_WRITE)})
    _store_block[(2,)](x, BLOCK=4)
    monkeypatch.setattr(memcheck, "allowed", set())
    with pytest.raises(memcheck.Violation):
        _store_block[(2,)](x, BLOCK=4)


@pytest.mark.no_memcheck
def test_marked_tests_run_unchecked():
    _store_block[(2,)](torch.zeros(4, dtype=torch.int32), BLOCK=4)


def test_accesses_through_a_table_of_addresses_are_checked_against_its_pointees():
    a, b, out = torch.randn(4), torch.randn(6), torch.empty(2, 4)
    table = torch.tensor([a.data_ptr(), b.data_ptr()])
    with pytest.raises(memcheck.Violation, match=r"out of bounds: 8 lane\(s\)"):  # no pointees: nothing known
        _gather_rows[(2,)](table, out, BLOCK=4)
    table.pointees = [a, None, b]
    _gather_rows[(2,)](table, out, BLOCK=4)
    assert torch.equal(out, torch.stack([a, b[:4]]))
    with pytest.raises(memcheck.Violation, match=r"out of bounds: 6 lane\(s\) .* at TABLE\.pointees\[0\]\[4\]"):
        _gather_rows[(2,)](table, torch.empty(2, 8), BLOCK=8)  # a holds 4 floats, b 6
    table = torch.tensor([b.data_ptr(), b.data_ptr() + 8])
    table.pointees = [b]
    with pytest.raises(memcheck.Violation, match=r"write-write race: 8 byte\(s\) .* TABLE\.pointees\[0\]\[2\]"):
        _store_through[(2,)](table, BLOCK=4)  # elements 2 and 3 of b are stored by both programs

"""Memory checker for Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

``install()`` patches the interpreter so that every launch (one ``kernel[grid](...)`` call) records,
per program, the bytes each active lane (mask true) reads, stores, and updates atomically; after the
launch it raises an ``AssertionError`` naming the kernel, the rule, example addresses (argument
name and element offset) and the programs involved, when

- **out of bounds**: an access touches a byte outside every tensor argument's view (the span from
  the lowest to the highest byte its sizes and strides reach);
- **write-write race**: two programs store to one byte;
- **read-write race**: a program reads a byte another program stores to or updates atomically;
- **atomic/plain mix**: a byte is updated atomically and also read or stored plainly in the same
  launch, even by a single program (a GPU orders neither a plain load after an atomic nor a plain
  store before one without a fence, so the pattern is a bug even within a program).

A tensor argument with a ``pointees`` attribute (a list of tensors or None, as a launcher sets on
a table of addresses it fills from those tensors) adds their views to the launch's tensors, so
accesses through the addresses are bounds-checked too (named ``ARG.pointees[i]``).

Several programs reading a byte, or atomically updating it, is fine. Out-of-bounds lanes are not
performed (loads give ``other``), so a bad kernel fails the check instead of crashing the process.
Pointers are not tracked to their argument: an access that lands in another argument's memory
counts as in bounds. ``tl.atomic_load``/``atomic_store`` (Triton ≥ 3.7) count as atomic.

Hooks: the interpreter's native memory module (``load``, ``store``, ``atomic_rmw``,
``atomic_cas``) is wrapped, ``GridExecutor._init_args_hst`` hands over the host copies of the
arguments (on the CPU the originals), and ``GridExecutor.__call__`` runs the check. ``enabled``
switches checking off; ``allowed`` holds ``(kernel name, rule)`` pairs that are not reported.
"""
from __future__ import annotations

import numpy as np
import torch

OUT_OF_BOUNDS = "out of bounds"
WRITE_WRITE = "write-write race"
READ_WRITE = "read-write race"
ATOMIC_PLAIN = "atomic/plain mix"

READ, WRITE, ATOMIC = 0, 1, 2
_KIND_NAMES = ("load", "store", "atomic")
_EXAMPLES = 3  # addresses shown per rule
_ALIGN = 16  # regions start on this boundary in the compact address space

enabled = True
allowed: set[tuple[str, str]] = set()

_launch: "Launch | None" = None
_atomic_depth = 0  # > 0 inside tl.atomic_load / tl.atomic_store


class Violation(AssertionError):
    """A launch broke a memory rule."""


def _named_tensors(names, values):
    """(name, tensor) for every tensor among ``values``, tuples and descriptors unpacked."""
    for name, value in zip(names, values):
        if isinstance(value, tuple):
            yield from _named_tensors([f"{name}[{i}]" for i in range(len(value))], value)
        elif hasattr(value, "base") and hasattr(value, "block_shape"):  # TensorDescriptor
            yield from _named_tensors([f"{name}.base"], [value.base])
        elif isinstance(value, torch.Tensor):
            yield name, value
        elif hasattr(value, "data_ptr"):  # TensorWrapper: a tensor reinterpreted as another dtype
            yield name, value.base


class Launch:
    """Accesses of one launch, in a compact address space made of the arguments' merged views."""

    def __init__(self, kernel: str):
        self.kernel = kernel
        self.grid = (1, 1, 1)
        self.args: list[tuple[str, int, int, int, int]] = []  # name, data_ptr, itemsize, lo, hi
        self.set_regions([])
        self.records = ([], [], [])  # per kind: (pid, itemsize, compact addresses)
        self.out_of_bounds: list[tuple[int, int, int, int]] = []  # kind, pid, address, itemsize
        self.out_of_bounds_lanes = 0

    # -- arguments -----------------------------------------------------------------------------

    def set_args(self, named):
        """Takes the launch's tensor arguments as (name, tensor) pairs."""
        for name, t in named:
            if t.numel() == 0:
                continue
            size = t.element_size()
            reach = [(n - 1) * s for n, s in zip(t.shape, t.stride())]
            lo = t.data_ptr() + size * sum(r for r in reach if r < 0)
            hi = t.data_ptr() + size * (sum(r for r in reach if r > 0) + 1)
            self.args.append((name, t.data_ptr(), size, lo, hi))
        self.set_regions(sorted((lo, hi) for *_, lo, hi in self.args))

    def set_regions(self, spans):
        """Merges overlapping byte spans into regions and lays them out in the compact space."""
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.starts = np.array([lo for lo, _ in merged], dtype=np.uint64)
        self.ends = np.array([hi for _, hi in merged], dtype=np.uint64)
        # compact = address - start16 + base keeps addresses' residues mod _ALIGN.
        self.start16 = self.starts - self.starts % np.uint64(_ALIGN)
        lengths = -(-(self.ends - self.start16).astype(np.int64) // _ALIGN) * _ALIGN
        self.base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    # -- recording -----------------------------------------------------------------------------

    def record(self, kind: int, pid: int, ptrs: np.ndarray, mask, itemsize: int):
        """Records the active lanes of one access; returns the mask with out-of-bounds lanes off."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ptrs.shape:
            mask = np.broadcast_to(mask, ptrs.shape)
        addrs = ptrs[mask].astype(np.uint64, copy=False)
        if addrs.size == 0:
            return mask
        region = self.starts.searchsorted(addrs, side="right") - 1
        safe = np.maximum(region, 0)
        inside = (region >= 0) & (addrs + np.uint64(itemsize) <= self.ends[safe]) if self.starts.size else \
            np.zeros(addrs.shape, dtype=bool)
        if not inside.all():
            bad = addrs[~inside]
            self.out_of_bounds_lanes += bad.size
            room = _EXAMPLES - len(self.out_of_bounds)
            self.out_of_bounds += [(kind, pid, int(a), itemsize) for a in bad[:max(room, 0)]]
            mask = mask.copy()
            mask[mask] = inside
            addrs, safe = addrs[inside], safe[inside]
        compact = (addrs - self.start16[safe]).astype(np.int64) + self.base[safe]
        self.records[kind].append((pid, itemsize, compact))
        return mask

    # -- checking ------------------------------------------------------------------------------

    def check(self):
        """Raises ``Violation`` describing every rule the launch broke (``allowed`` ones aside)."""
        problems = [p for p in self._problems() if (self.kernel, p[0]) not in allowed]
        if problems:
            lines = [f"memcheck: kernel {self.kernel} (grid {self.grid}) breaks {len(problems)} rule(s):"]
            lines += [f"  {rule}: {text}" for rule, text in problems]
            raise Violation("\n".join(lines))

    def _problems(self):
        if self.out_of_bounds_lanes:
            examples = "; ".join(f"{_KIND_NAMES[k]} of {s} byte(s) at {self._where(a)} by program {self._pid(p)}"
                                 for k, p, a, s in self.out_of_bounds)
            yield OUT_OF_BOUNDS, f"{self.out_of_bounds_lanes} lane(s) outside the tensor arguments, e.g. {examples}"
        flat = [self._flat(records) for records in self.records]
        touched = np.zeros(self.starts.size, dtype=bool)  # regions stored to or updated atomically
        touched[self._region(np.concatenate([flat[WRITE][0], flat[ATOMIC][0]]))] = True
        if not touched.any():
            return
        flat[READ] = tuple(a[touched[self._region(flat[READ][0])]] for a in flat[READ])
        (read_units, read_pids), (write_units, write_pids), (atomic_units, atomic_pids) = self._units(flat)
        n = int(np.prod(self.grid))
        writes = _unique_pairs(write_units, write_pids, n)
        atomics = _unique_pairs(atomic_units, atomic_pids, n)
        # Only reads of stored or atomically updated units matter: drop the others before sorting.
        updated, low, high = _pid_range(*_unique_pairs(np.concatenate([writes[0], atomics[0]]),
                                                       np.concatenate([writes[1], atomics[1]]), n))
        at = np.minimum(np.searchsorted(updated, read_units), updated.size - 1)
        hit = updated[at] == read_units
        reads = _unique_pairs(read_units[hit], read_pids[hit], n)

        # write-write: after deduplication, one unit twice means two programs.
        same = np.flatnonzero(writes[0][1:] == writes[0][:-1])
        if same.size:
            yield WRITE_WRITE, self._examples(
                "stored by two programs", writes[0][same], writes[1][same], writes[1][same + 1])

        # atomic/plain: a unit both updated atomically and read or stored plainly.
        plain, plain_pids = _unique_pairs(np.concatenate([reads[0], writes[0]]),
                                          np.concatenate([reads[1], writes[1]]), n)
        at = np.minimum(np.searchsorted(plain, atomics[0]), max(plain.size - 1, 0))
        mixed = np.flatnonzero(plain[at] == atomics[0]) if plain.size else at[:0]
        if mixed.size:
            yield ATOMIC_PLAIN, self._examples("updated atomically and accessed plainly", atomics[0][mixed],
                                               atomics[1][mixed], plain_pids[at[mixed]])

        # read-write: a unit read by one program and stored or updated by another.
        at = np.searchsorted(updated, reads[0])
        other = np.where(low[at] != reads[1], low[at], high[at])
        race = np.flatnonzero(other != reads[1])
        if race.size:
            yield READ_WRITE, self._examples("read by one program and written by another",
                                             reads[0][race], reads[1][race], other[race])

    def _flat(self, records):
        """(compact addresses, sizes, program ids) of one kind's records, one entry per lane."""
        if not records:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        counts = [c.size for *_, c in records]
        return (np.concatenate([c for *_, c in records]), np.repeat([s for _, s, _ in records], counts),
                np.repeat([p for p, *_ in records], counts))

    def _region(self, compact):
        return np.searchsorted(self.base, compact, side="right") - 1

    def _units(self, flat):
        """Per kind: (unit keys, program ids), one entry per unit touched; a unit is the widest
        power of two (≤ 16 bytes) that divides every access size and address in its region, so
        overlapping accesses of different widths share units and uniform ones need no expansion."""
        unit = np.full(self.starts.size, _ALIGN, dtype=np.int64)
        regions = [self._region(compact) for compact, _, _ in flat]
        for (compact, sizes, _), region in zip(flat, regions):
            low_bit = compact & -compact
            np.minimum.at(unit, region, np.minimum(sizes, np.where(low_bit == 0, _ALIGN, low_bit)))
        self.unit = unit
        self.unit_base = np.concatenate([[0], np.cumsum((self.base[1:] - self.base[:-1]) // unit)])
        result = []
        for (compact, sizes, pids), region in zip(flat, regions):
            keys = (compact - self.base[region]) // unit[region] + self.unit_base[region]
            count = sizes // unit[region]
            if count.size and count.max() > 1:
                keys, pids = np.repeat(keys, count), np.repeat(pids, count)
                keys += np.arange(keys.size) - np.repeat(np.cumsum(count) - count, count)
            result.append((keys, pids))
        return result

    # -- reporting -----------------------------------------------------------------------------

    def _examples(self, what, keys, pids_a, pids_b):
        """``keys`` (sorted) are the offending units, with one pair of programs each."""
        first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        keys = keys[first]
        size = int(self.unit[np.searchsorted(self.unit_base, keys, side="right") - 1].sum())
        shown = "; ".join(f"{self._where(self._address(k))} by programs {self._pid(pids_a[i])} and "
                          f"{self._pid(pids_b[i])}" for k, i in zip(keys[:_EXAMPLES], first[:_EXAMPLES]))
        return f"{size} byte(s) {what}, e.g. {shown}"

    def _address(self, key) -> int:
        region = int(np.searchsorted(self.unit_base, key, side="right") - 1)
        return int(self.start16[region]) + int(key - self.unit_base[region]) * int(self.unit[region])

    def _pid(self, pid) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(int(pid), self.grid))

    def _where(self, address: int) -> str:
        """``name[element offset]`` of the argument whose view holds ``address`` (else the nearest)."""
        if not self.args:
            return f"0x{address:x} (the kernel has no tensor arguments)"
        inside = [a for a in self.args if a[3] <= address < a[4]]
        name, ptr, size, lo, hi = inside[0] if inside else \
            min(self.args, key=lambda a: max(a[3] - address, address - a[4] + 1))
        offset, rest = divmod(address - ptr, size)
        text = f"{name}[{offset}]" + (f" + {rest} byte(s)" if rest else "") + f" at 0x{address:x}"
        if not inside:
            text += f" (view spans {name}[{(lo - ptr) // size}:{(hi - ptr) // size}])"
        return text


def _pid_range(units, pids):
    """Distinct units of sorted (unit, program) pairs, with each unit's lowest and highest program."""
    first = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    last = np.r_[first[1:], units.size] - 1
    return units[first], pids[first], pids[last]


def _unique_pairs(units, pids, n_programs):
    """Distinct (unit, program) pairs sorted by unit, then program."""
    if units.size == 0:
        return units, pids
    if (int(units.max()) + 1) * n_programs < 2**62:  # one sort of a combined key
        key = np.sort(units * n_programs + pids)  # (np.unique hashes first: slower here)
        key = key[np.r_[True, key[1:] != key[:-1]]]
        return key // n_programs, key % n_programs
    order = np.lexsort((pids, units))
    units, pids = units[order], pids[order]
    keep = np.r_[True, (units[1:] != units[:-1]) | (pids[1:] != pids[:-1])]
    return units[keep], pids[keep]


class _CheckedMemory:
    """Stands in for the interpreter's native memory module: records each access, then does it."""

    def __init__(self, native, builder):
        self._native = native
        self._builder = builder

    def __getattr__(self, name):
        return getattr(self._native, name)

    def _pid(self):
        x, y, z = self._builder.grid_idx
        _, ny, nz = self._builder.grid_dim
        return (x * ny + y) * nz + z

    def load(self, ptrs, mask, other, dtype):
        if _launch is not None:
            mask = _launch.record(ATOMIC if _atomic_depth else READ, self._pid(), ptrs, mask,
                                  np.dtype(dtype).itemsize)
        return self._native.load(ptrs, np.ascontiguousarray(mask), other, dtype)

    def store(self, ptrs, value, mask):
        if _launch is not None:
            mask = _launch.record(ATOMIC if _atomic_depth else WRITE, self._pid(), ptrs, mask,
                                  value.dtype.itemsize)
        return self._native.store(ptrs, value, np.ascontiguousarray(mask))

    def atomic_rmw(self, op, ptrs, value, mask, sem):
        if _launch is not None:
            mask = _launch.record(ATOMIC, self._pid(), ptrs, mask, value.dtype.itemsize)
        return self._native.atomic_rmw(op, ptrs, value, np.ascontiguousarray(mask), sem)

    def atomic_cas(self, ptrs, cmp, value, sem):
        if _launch is None:
            return self._native.atomic_cas(ptrs, cmp, value, sem)
        mask = _launch.record(ATOMIC, self._pid(), ptrs, True, value.dtype.itemsize)
        if mask.all():
            return self._native.atomic_cas(ptrs, cmp, value, sem)
        # No mask in the native call: swap the in-bounds lanes only; the others "succeed".
        cmp, value = np.broadcast_to(cmp, ptrs.shape), np.broadcast_to(value, ptrs.shape)
        result = cmp.copy()
        if mask.any():
            result[mask] = self._native.atomic_cas(ptrs[mask], cmp[mask], value[mask], sem)
        return result


def install():
    """Patches Triton's interpreter so that every launch is checked (idempotent; no-op without Triton)."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return

    if getattr(interpreter, "_memcheck_installed", False):
        return
    interpreter._interpreter = _CheckedMemory(interpreter._interpreter, interpreter.interpreter_builder)
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    run, init_args = executor.__call__, executor._init_args_hst

    def __call__(self, *args, **kwargs):
        global _launch
        if not enabled or _launch is not None:
            return run(self, *args, **kwargs)
        launch = _launch = Launch(self.fn.__name__)
        try:
            result = run(self, *args, **kwargs)
        except Exception:
            if launch.out_of_bounds_lanes:  # the likely cause of the error
                launch.grid = interpreter.interpreter_builder.grid_dim
                launch.check()
            raise
        finally:
            _launch = None
        launch.grid = interpreter.interpreter_builder.grid_dim
        launch.check()
        return result

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        if _launch is not None:
            names = [*self.arg_names[:len(args_hst)], *kwargs_hst]
            named = list(_named_tensors(names, [*args_hst, *kwargs_hst.values()]))
            for name, value in zip(names, [*args_dev, *kwargs.values()]):  # host copies lose attributes
                pointees = getattr(value, "pointees", None) or ()
                named += _named_tensors([f"{name}.pointees[{i}]" for i in range(len(pointees))], pointees)
            _launch.set_args(named)
        return args_hst, kwargs_hst

    def counted_atomic(method):
        def wrapper(*args, **kwargs):
            global _atomic_depth
            _atomic_depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                _atomic_depth -= 1
        return wrapper

    executor.__call__, executor._init_args_hst = __call__, _init_args_hst
    for name in ("create_atomic_load", "create_atomic_store"):
        if hasattr(builder, name):
            setattr(builder, name, counted_atomic(getattr(builder, name)))
    interpreter._memcheck_installed = True

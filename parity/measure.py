"""How far flaxres is from the reference: the relative error of one tensor and the worst of a
check (:class:`Measure`), held to a tolerance or to PyTorch fp32's own rounding error."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

FLOOR_FACTOR = 2.0  # flaxres fp32 may be at most this much less accurate than PyTorch fp32


@dataclasses.dataclass
class Measure:
    """The worst tensor of one check at one precision.

    ``fp64``: both frameworks in float64, held to the tolerance: the proof that flaxres computes
    the same function (any mapping or semantics bug is O(1) here). ``fp32``: flaxres in fp32
    against the float64 reference; a tensor passes if within the tolerance or within
    ``FLOOR_FACTOR`` times PyTorch fp32's own error against that reference (``floor``): deep
    BatchNorm nets amplify rounding exponentially with depth, so no fp32 implementation meets
    1e-5 there, and the only fair bar is the one PyTorch fp32 itself reaches.
    """

    check: str
    precision: str
    error: float
    tol: float
    where: str
    floor: float = 0.0
    extra_ok: bool = True
    largest_floor: float = 0.0  # PyTorch fp32's largest error over the tensors measured
    note: str = ""
    chaotic: bool = False  # PyTorch fp32 itself too far off float64: moot (checks._flag_chaos)

    @property
    def allowed(self) -> float:
        return max(self.tol, FLOOR_FACTOR * self.floor)

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.allowed and self.extra_ok)

    def __str__(self) -> str:
        s = (f"{self.check} [{self.precision}]: max rel err {self.error:.2e} (tol {self.tol:.0e}"
             + (f"; PyTorch fp32 {self.floor:.2e}" if self.floor > self.tol / FLOOR_FACTOR else "")
             + f") worst at {self.where}"
             + (f"; PyTorch fp32 up to {self.largest_floor:.2e} elsewhere"
                if self.largest_floor > max(self.floor, self.tol) else ""))
        return s + (f"; {self.note}" if self.note else "")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (b the reference); the absolute error where b is all zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    return float(d / nb) if nb > 0 else float(d)


def worst(check: str, precision: str, pairs: Iterable[tuple], tol: float, **kw) -> Measure:
    """Measure over named ``(name, flaxres, reference[, pytorch_fp32])`` tuples, the last a
    callable giving one PyTorch fp32 result, a tuple of them or a :class:`Floor`, run only where
    flaxres misses the tolerance: the tensor worst relative to what it is allowed. Shapes must
    agree exactly; ``None`` on the flaxres side (a tensor flaxres did not produce) fails."""
    m = Measure(check, precision, 0.0, tol, "-", **kw)
    ratio = -1.0
    for name, a, b, *t32 in pairs:
        if a is None or np.shape(a) != np.shape(b):
            got = "missing" if a is None else f"shape {np.shape(a)}"
            return Measure(check, precision, float("inf"), tol,
                           f"{name}: flaxres {got}, reference {np.shape(b)}", **kw)
        e = rel_err(a, b)
        floor = fp32_floor(t32[0](), b) if t32 and not e <= tol else 0.0  # PyTorch fp32 if needed
        r = e / max(tol, FLOOR_FACTOR * floor)
        m.largest_floor = max(m.largest_floor, floor)
        if not r <= ratio:  # NaN counts as worst
            ratio, m.error, m.where, m.floor = r, e, name, floor
    return m


class Floor(float):
    """A rounding floor given as a relative error, where no PyTorch fp32 result of the same kind
    measures it fairly (see ``Case.loss_floor``)."""


def fp32_floor(t32: Floor | np.ndarray | tuple[np.ndarray, ...], b: np.ndarray) -> float:
    """PyTorch fp32's error: one result, or the largest over several equally valid runs; a
    :class:`Floor` as it is."""
    if isinstance(t32, Floor):
        return float(t32)
    return max(rel_err(t, b) for t in (t32 if isinstance(t32, tuple) else (t32,)))


def same_classes(j: np.ndarray, ref: np.ndarray) -> tuple[bool, str]:
    """Predicted classes equal the reference's, and a note naming how many differ."""
    bad = j.argmax(1) != ref.argmax(1)
    return (not bad.any(), f"argmax differs on {int(bad.sum())} of {len(bad)}" if bad.any() else "")


def one_sided(mine: Iterable[str], theirs: Iterable[str]) -> str:
    """A note naming the tensors only one side has ('' if the names agree)."""
    mine, theirs = set(mine), set(theirs)
    parts = [f"only in flaxres: {sorted(mine - theirs)}"] if mine - theirs else []
    parts += [f"missing in flaxres: {sorted(theirs - mine)}"] if theirs - mine else []
    return "; ".join(parts)

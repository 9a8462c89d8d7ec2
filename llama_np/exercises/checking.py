"""How a checker judges a student's function: run the cases, count correct values, name the mistake.

A checker is a list of ``Case``s (arguments and the library's answer) and a list of
``Mistake``s, each with known-wrong versions of the function written out. When the student's
function fails, its outputs are compared with those of every wrong version: if one reproduces
them, its hint names the mistake. Otherwise a generic hint is given (the function raised, the
shape is wrong or transposed, the dtype is wrong, NaN appeared, the values are scaled).

Values are compared with the project's tolerance rule (tests/tolerance.py):
|ours − expected| <= tolerance · max(1, |expected|), elementwise; −inf must meet −inf.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

DEFAULT_TOLERANCE = 1e-4


@dataclass
class Case:
    """One call of the function under test and the answer the library gives.

    ``expected`` is an array or a tuple of arrays (the function returns that many). ``where``
    (one boolean array per output, broadcastable to it, or None for all) selects the elements
    that carry meaning; the others — rows of padding — are only required to be finite.
    ``tags`` name features of the case ("gqa", "padding", …) used to explain a failure that
    happens only on cases with that feature.
    """

    name: str
    args: tuple
    expected: Any
    where: Any = None
    tags: frozenset = frozenset()

    def expected_parts(self) -> tuple:
        return self.expected if isinstance(self.expected, tuple) else (self.expected,)

    def where_parts(self) -> tuple:
        if isinstance(self.where, tuple):
            return self.where
        return (self.where,) * len(self.expected_parts())


@dataclass
class Mistake:
    """A classic mistake: its name, the hint shown to the student and wrong versions of the
    function (same signature) that make it."""

    name: str
    hint: str
    variants: tuple


@dataclass
class CaseOutcome:
    """How the function did on one case."""

    case: Case
    correct: int  # elements right
    total: int  # elements judged
    parts: tuple | None = None  # the function's outputs as arrays, None when it raised
    error: BaseException | None = None
    problem: str | None = None  # shape, dtype or return-value trouble, in words
    worst_error: float = 0.0  # the largest scaled difference over the compared elements
    worst_index: tuple | None = None

    @property
    def fraction_correct(self) -> float:
        return self.correct / self.total if self.total else 1.0

    @property
    def passed(self) -> bool:
        return self.correct == self.total and self.problem is None and self.error is None


@dataclass
class CheckResult:
    """What a checker returns: ``passed``, ``fraction_correct`` (share of values right over all
    cases), ``hint`` (None when passed), ``mistake`` (the named mistake recognised, if any),
    ``cases`` (one ``CaseOutcome`` each) and the printed ``report``."""

    name: str
    passed: bool
    fraction_correct: float
    hint: str | None
    mistake: str | None
    cases: list = field(default_factory=list)
    report: str = ""

    @property
    def worst_case(self) -> CaseOutcome:
        return min(self.cases, key=lambda outcome: (outcome.passed, outcome.fraction_correct))

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self):
        return (f"CheckResult({self.name}: passed={self.passed}, "
                f"fraction_correct={self.fraction_correct:.3f}, mistake={self.mistake!r})")


# ---------------------------------------------------------------------------- comparing


def close(ours: np.ndarray, expected: np.ndarray, tolerance: float) -> np.ndarray:
    """Elementwise: within tolerance · max(1, |expected|), or exactly equal (so −inf meets −inf)."""
    with np.errstate(invalid="ignore", over="ignore"):
        ours64, expected64 = ours.astype(np.float64), expected.astype(np.float64)
        deviation = np.abs(ours64 - expected64) / np.maximum(1.0, np.abs(expected64))
        return (deviation <= tolerance) | (ours64 == expected64)


def scaled_deviation(ours: np.ndarray, expected: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        ours64, expected64 = ours.astype(np.float64), expected.astype(np.float64)
        deviation = np.abs(ours64 - expected64) / np.maximum(1.0, np.abs(expected64))
        return np.where(ours64 == expected64, 0.0, np.nan_to_num(deviation, nan=np.inf, posinf=np.inf))


def as_parts(output, count: int) -> tuple[tuple | None, str | None]:
    """The function's return value as ``count`` arrays, or a problem in words."""
    if output is None:
        return None, "returned None (is a `return` missing?)"
    if count > 1:
        if not isinstance(output, (tuple, list)) or len(output) != count:
            return None, f"returned a {type(output).__name__}; it should return a tuple of {count} arrays"
        items = tuple(output)
    else:
        items = (output,)
    try:
        return tuple(np.asarray(item) for item in items), None
    except (ValueError, TypeError) as error:
        return None, f"returned something that is not an array ({error})"


def shape_problem(ours: np.ndarray, expected: np.ndarray) -> str | None:
    if ours.shape == expected.shape:
        return None
    if ours.ndim >= 2 and ours.shape == expected.shape[:-2] + expected.shape[-2:][::-1]:
        return f"has shape {ours.shape}, expected {expected.shape}: the last two axes look transposed"
    if ours.shape == expected.shape[::-1]:
        return f"has shape {ours.shape}, expected {expected.shape}: the axes look transposed"
    return f"has shape {ours.shape}, expected {expected.shape}"


def dtype_problem(ours: np.ndarray, expected: np.ndarray) -> str | None:
    """Only a change of kind counts (float vs integer vs bool); float32 vs float64 is fine."""
    kinds = {"f": "floating point", "i": "integer", "u": "integer", "b": "boolean"}
    ours_kind, expected_kind = kinds.get(ours.dtype.kind, ours.dtype.name), kinds.get(expected.dtype.kind)
    if ours_kind == expected_kind:
        return None
    return f"has dtype {ours.dtype}, expected {expected_kind} values ({expected.dtype})"


def judge(case: Case, output, tolerance: float) -> CaseOutcome:
    """Count the correct elements of ``output`` for ``case``."""
    expected_parts, where_parts = case.expected_parts(), case.where_parts()
    total = sum(int(np.size(e)) for e in expected_parts)
    parts, problem = as_parts(output, len(expected_parts))
    if parts is None:
        return CaseOutcome(case, 0, total, problem=problem)
    correct, worst, worst_index = 0, 0.0, None
    for position, (ours, expected, where) in enumerate(zip(parts, expected_parts, where_parts)):
        label = f"output {position} " if len(parts) > 1 else ""
        trouble = shape_problem(ours, expected)
        if trouble is None and not np.issubdtype(ours.dtype, np.number) and ours.dtype.kind != "b":
            trouble = f"has dtype {ours.dtype}, expected numbers"
        if trouble:
            problem = problem or label + trouble
            continue
        selected = np.ones(expected.shape, bool) if where is None else np.broadcast_to(where, expected.shape)
        good = np.where(selected, close(ours, expected, tolerance), np.isfinite(ours.astype(np.float64)))
        correct += int(good.sum())
        deviation = np.where(selected, scaled_deviation(ours, expected), np.where(good, 0.0, np.inf))
        if deviation.size and deviation.max() > worst:
            worst, worst_index = float(deviation.max()), np.unravel_index(int(deviation.argmax()), deviation.shape)
        if good.all():
            problem = problem or (None if dtype_problem(ours, expected) is None
                                  else label + dtype_problem(ours, expected))
    return CaseOutcome(case, correct, total, parts=parts, problem=problem, worst_error=worst,
                       worst_index=None if worst_index is None else tuple(int(i) for i in worst_index))


def call_quietly(fn: Callable, args: tuple):
    """fn(*args) on copies of the arguments, with NumPy's warnings silenced."""
    copies = tuple(np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*copies)


# ---------------------------------------------------------------------------- naming the mistake


def reproduces(outcome: CaseOutcome, variant: Callable, tolerance: float) -> bool:
    """True when ``variant`` gives the student's outputs on this case (NaN matching NaN)."""
    try:
        theirs = call_quietly(variant, outcome.case.args)
    except Exception:
        return False
    parts, _ = as_parts(theirs, len(outcome.parts))
    if parts is None:
        return False
    for ours, wrong in zip(outcome.parts, parts):
        if ours.shape != wrong.shape:
            return False
        both_nan = np.isnan(ours.astype(np.float64)) & np.isnan(wrong.astype(np.float64))
        if not (close(ours, wrong, tolerance) | both_nan).all():
            return False
    return True


def recognise(outcomes: Sequence[CaseOutcome], mistakes: Sequence[Mistake], tolerance: float) -> Mistake | None:
    """The first mistake one of whose versions reproduces every failed case that returned."""
    failed = [o for o in outcomes if not o.passed and o.parts is not None]
    if not failed:
        return None
    for mistake in mistakes:
        for variant in mistake.variants:
            if all(reproduces(outcome, variant, tolerance) for outcome in failed):
                return mistake
    return None


def tag_explanation(outcomes: Sequence[CaseOutcome], tag_hints: dict) -> str | None:
    """A hint when every failed case has one feature (e.g. GQA) and some other case passed.

    Features are tried in the order of ``tag_hints``, most telling first. A passing case may have
    the feature too: a GQA mistake can pass the case with one key/value head, where NumPy's
    broadcasting hides it.
    """
    failed = [o for o in outcomes if not o.passed]
    if len(failed) == len(outcomes):
        return None
    for tag, hint in tag_hints.items():
        if all(tag in o.case.tags for o in failed):
            return hint
    return None


def looks_scaled(outcome: CaseOutcome) -> float | None:
    """The factor c when the output is c × expected (c ≠ 1) on the compared elements."""
    if outcome.parts is None or outcome.problem:
        return None
    ours = np.concatenate([p.astype(np.float64).ravel() for p in outcome.parts])
    expected = np.concatenate([np.broadcast_to(e, p.shape).astype(np.float64).ravel()
                               for p, e in zip(outcome.parts, outcome.case.expected_parts())])
    finite = np.isfinite(ours) & np.isfinite(expected)
    ours, expected = ours[finite], expected[finite]
    if expected.size == 0 or not expected.any():
        return None
    factor = float(ours @ expected / (expected @ expected))
    residual = np.abs(ours - factor * expected).max() / max(1e-12, np.abs(expected).max())
    if residual < 1e-3 and abs(factor - 1) > 1e-3:
        return factor
    return None


def generic_hint(outcomes: Sequence[CaseOutcome], tag_hints: dict) -> str:
    """What to say when no known mistake reproduces the failures."""
    failed = [o for o in outcomes if not o.passed]
    errors = [o for o in failed if o.error is not None]
    if errors and all(isinstance(o.error, NotImplementedError) for o in errors) and len(errors) == len(outcomes):
        return "Your function still raises NotImplementedError: replace that line with your code."
    by_tag = tag_explanation(outcomes, tag_hints)
    if by_tag:
        return by_tag
    if errors:
        problem = errors[0].problem
        hint = "Print the shapes of the arrays you combine on the line that failed."
        if "broadcast" in problem:
            hint = ("Two arrays whose shapes do not broadcast: did you keep the reduced axis "
                    "(keepdims=True), or give a (B, T, hd) table its head axis (cos[:, None])? "
                    "Print the shapes on the line that failed.")
        return f"Your function {problem} (case '{errors[0].case.name}'). {hint}"
    with_problem = [o for o in failed if o.problem]
    if with_problem:
        problem = with_problem[0].problem
        # problems read either "returned ..." (about the call) or "has ..." (about the array)
        subject = "Your function" if problem.startswith("returned") else "Your result"
        return f"{subject} {problem} (case '{with_problem[0].case.name}')."
    with_nan = [o for o in failed if any(np.isnan(p.astype(np.float64)).any() for p in o.parts)]
    if with_nan:
        return (f"Your result contains NaN (case '{with_nan[0].case.name}'): look for 0/0, "
                "inf − inf or a softmax over a row that is all −inf.")
    for outcome in failed:
        factor = looks_scaled(outcome)
        if factor is not None:
            return (f"Your values are the expected ones times {factor:.4g}{_named_factor(factor, outcome)} "
                    f"(case '{outcome.case.name}'): a scale factor is missing, extra or inverted.")
    worst = min(failed, key=lambda o: o.fraction_correct)
    return (f"{percent(1 - worst.fraction_correct)} of the values of case '{worst.case.name}' differ "
            f"(largest scaled difference {worst.worst_error:.3g} at index {worst.worst_index}). Compare "
            "your intermediate arrays with the library's on that case, one step at a time.")



def _named_factor(factor: float, outcome) -> str:
    """", that is 1/√256," when the factor is a power of the last axis's size (a sum for a mean,
    a missing 1/√hd), else ""."""
    size = outcome.case.expected_parts()[0].shape[-1] if outcome.case.expected_parts()[0].ndim else 0
    if size < 2:
        return ""
    for value, name in ((size ** -0.5, f"1/√{size}"), (size ** 0.5, f"√{size}"),
                        (1 / size, f"1/{size}"), (float(size), f"{size}")):
        if abs(factor - value) <= 1e-3 * value:
            return f", that is {name} ({size} is the size of the last axis)"
    return ""

# ---------------------------------------------------------------------------- running a check


def run_check(name: str, fn: Callable, cases: Sequence[Case], mistakes: Sequence[Mistake] = (),
              tag_hints: dict | None = None, tolerance: float = DEFAULT_TOLERANCE,
              verbose: bool = True) -> CheckResult:
    """Run ``fn`` on every case, judge it, name the likely mistake and print a short report."""
    outcomes = []
    for case in cases:
        try:
            output = call_quietly(fn, case.args)
        except Exception as error:  # the student's code: report, never propagate
            total = sum(int(np.size(e)) for e in case.expected_parts())
            outcome = CaseOutcome(case, 0, total, error=error)
            outcome.problem = f"raised {type(error).__name__}" + (f": {error}" if str(error) else "")
        else:
            outcome = judge(case, output, tolerance)
        outcomes.append(outcome)
    correct = sum(o.correct for o in outcomes)
    total = sum(o.total for o in outcomes)
    passed = all(o.passed for o in outcomes)
    mistake = None if passed else recognise(outcomes, mistakes, tolerance)
    hint = None if passed else (mistake.hint if mistake else generic_hint(outcomes, tag_hints or {}))
    result = CheckResult(name, passed, correct / total if total else 1.0, hint,
                         mistake.name if mistake else None, outcomes)
    result.report = format_report(result)
    if verbose:
        print(result.report)
    return result


def percent(fraction: float) -> str:
    """A share as a percentage that never shows 100.0% unless every value is right."""
    shown = 100 * fraction
    return f"{min(shown, 99.9) if fraction < 1 else shown:.1f}%"


def format_report(result: CheckResult) -> str:
    """A few lines: verdict, share of values correct, one line per case, the hint."""
    right = sum(o.passed for o in result.cases)
    verdict = "passed" if result.passed else "FAILED"
    lines = [f"{result.name}: {verdict} — {right} of {len(result.cases)} cases right, "
             f"{percent(result.fraction_correct)} of values correct"]
    worst = result.worst_case
    for outcome in result.cases:
        mark = "✓" if outcome.passed else "✗"
        line = f"  {mark} {outcome.case.name}"
        if not outcome.passed:
            detail = outcome.problem or (f"{percent(outcome.fraction_correct)} correct, largest "
                                         f"difference {outcome.worst_error:.3g} at {outcome.worst_index}")
            line += f": {detail}" + ("   <- worst case" if outcome is worst else "")
        lines.append(line)
    if result.hint:
        lines.append(f"Hint: {result.hint}")
    return "\n".join(lines)

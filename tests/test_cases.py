"""The one table of rule cases (agnosticopt.conformance._cases.TABLE) and its lists.

Each list claims to cover something; these tests check the claim, so that a rule
added to agnosticopt without a row, or a row dropped, fails here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from agnosticopt.conformance import _cases

import agnosticopt as opt

#: Rule classes that a list may lack, with the reason.
NOT_IN_CONFORMANCE = {
    opt.Scheduled: "its hyperparameters change per step; tests/test_schedules.py checks it",
}
NOT_IN_TEST_RULES = {
    **NOT_IN_CONFORMANCE,
    opt.ClipGlobalNorm: "a global rule (a norm over the whole tree); tests/test_global.py",
    opt.SkipNonFinite: "a global rule (a check over the whole tree); tests/test_global.py",
}


def _rule_classes() -> set[type]:
    return {
        value
        for name in opt.__all__
        if inspect.isclass(value := getattr(opt, name))
        and issubclass(value, opt.Rule)
        and value is not opt.Rule
    }


def _parts(rule: opt.Rule) -> Iterator[opt.Rule]:
    """``rule`` and every rule inside it (chains, wrappers)."""
    yield rule
    if isinstance(rule, opt.OptimiserChain):
        for inner in rule.opts:
            yield from _parts(inner)
    elif isinstance(rule, (opt.MixedPrecision, opt.SkipNonFinite)):
        yield from _parts(rule.rule)


def _classes_in(cases: tuple[_cases.Case, ...]) -> set[type]:
    return {type(part) for case in cases for part in _parts(case.rule)}


def test_parts_sees_inside_chains_and_wrappers() -> None:
    rule = opt.MixedPrecision(
        opt.SkipNonFinite(opt.OptimiserChain(opt.Lion(), opt.ClipGrad()))
    )
    assert {type(r) for r in _parts(rule)} == {
        opt.SkipNonFinite,
        opt.OptimiserChain,
        opt.MixedPrecision,
        opt.Lion,
        opt.ClipGrad,
    }


def test_names_are_unique_and_rules_appear_once() -> None:
    names = [row.case.name for row in _cases.TABLE]
    assert len(names) == len(set(names))
    rules = [row.case.rule for row in _cases.TABLE]
    twice = [repr(r) for i, r in enumerate(rules) if r in rules[:i]]
    assert not twice, f"give one row every list: {twice}"


def test_every_list_has_cases_and_every_row_a_list() -> None:
    assert all(_cases.cases_in(name) for name in _cases.LISTS)
    assert all(row.lists and row.lists <= set(_cases.LISTS) for row in _cases.TABLE)


def test_conformance_covers_every_rule_class() -> None:
    missing = _rule_classes() - _classes_in(_cases.CASES) - set(NOT_IN_CONFORMANCE)
    assert not missing, (
        f"no conformance case uses {sorted(c.__name__ for c in missing)}"
    )


def test_test_rules_lists_cover_every_elementwise_rule_class() -> None:
    listed = _cases.cases_in(_cases.OPTIMISERS_JL) + _cases.cases_in(_cases.MODIFIERS)
    missing = _rule_classes() - _classes_in(listed) - set(NOT_IN_TEST_RULES)
    assert not missing, (
        f"tests/test_rules.py's lists lack {sorted(c.__name__ for c in missing)}"
    )


def test_exemptions_are_real() -> None:
    classes = _rule_classes()
    assert set(NOT_IN_TEST_RULES) <= classes
    assert not set(NOT_IN_CONFORMANCE) & _classes_in(_cases.CASES)


def test_conformance_cases_are_the_table_rows_in_order() -> None:
    rows = [row.case for row in _cases.TABLE if _cases.CONFORMANCE in row.lists]
    assert list(_cases.CASES) == rows
    assert (
        _cases.case_named("adam") is _cases.CASES[[c.name for c in rows].index("Adam")]
    )


@pytest.mark.parametrize(("name", "lists"), [("Adam", ("nope",)), ("Adam", ())])
def test_a_row_without_a_known_list_is_refused(
    name: str, lists: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="lists must be some of"):
        _cases._row(name, opt.Adam(), *lists)


def test_an_unknown_list_is_named() -> None:
    with pytest.raises(KeyError, match="the lists are: conformance"):
        _cases.cases_in("torch")

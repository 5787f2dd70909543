import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgpo_trl.saliency.tags import NO_EXPRESSION, TagLimits, format_answer, parse_answer

WELL_FORMED = "<think>a red circle stands out</think><answer><rg>the red circle</rg></answer>"


def test_parses_a_well_formed_sod_answer():
    parsed = parse_answer(WELL_FORMED, task="sod")
    assert parsed.ok
    assert parsed.think == "a red circle stands out"
    assert parsed.regions == ["the red circle"]
    assert parsed.instances == []


def test_parses_sis_instances_in_order_and_allows_whitespace_between_blocks():
    text = "<think>two</think>\n<answer>\n  <ins> the red circle </ins>\n  <ins>the blue square</ins>\n</answer>\n"
    parsed = parse_answer(text, task="sis")
    assert parsed.ok, parsed.problems
    assert parsed.instances == ["the red circle", "the blue square"]


def test_think_is_optional():
    parsed = parse_answer("<answer><rg>the dog</rg></answer>", task="cosod")
    assert parsed.ok and parsed.think is None and parsed.regions == ["the dog"]


@pytest.mark.parametrize(
    "text, task, problem",
    [
        ("<think>x</think><answer><ins>a</ins></answer>", "sod", "<ins> in a sod answer (expects <rg>)"),
        ("<think>x</think><answer><rg>a</rg></answer>", "sis", "<rg> in a sis answer (expects <ins>)"),
        ("<answer><rg>a</rg><ins>b</ins></answer>", None, "mixes <rg> and <ins>"),
        ("<think>x</think><answer><rg>a</rg>", "sod", "unclosed <answer>"),
        ("<answer><rg>a</answer>", "sod", "unclosed <rg>"),
        ("<answer><rg>a<rg>b</rg></rg></answer>", "sod", "<rg> nested inside <rg>"),
        ("<think><rg>a</rg></think><answer><rg>a</rg></answer>", "sod", "<rg> nested inside <think>"),
        ("<answer><rg> </rg></answer>", "sod", "empty <rg>"),
        ("<answer></answer>", "sod", "no expression in <answer>"),
        ("<think>x</think>", "sod", "missing <answer>"),
        ("hello <answer><rg>a</rg></answer>", "sod", "text outside tags"),
        ("<answer><rg>a</rg></answer> and more", "sod", "text after </answer>"),
        ("<answer>the <rg>a</rg></answer>", "sod", "text inside <answer> outside <rg>/<ins>"),
        ("<answer><rg>a</rg></answer><answer><rg>b</rg></answer>", "sod", "more than one <answer>"),
        ("<answer><rg>a</rg></answer><think>x</think>", "sod", "<think> after <answer>"),
        ("<think>a</think><think>b</think><answer><rg>a</rg></answer>", "sod", "more than one <think>"),
        ("<rg>a</rg><answer><rg>a</rg></answer>", "sod", "<rg> outside <answer>"),
        ("<answer><rg>a</rg></rg></answer>", "sod", "stray </rg>"),
    ],
)
def test_reports_each_kind_of_problem(text, task, problem):
    parsed = parse_answer(text, task=task)
    assert not parsed.ok
    assert problem in parsed.problems


@pytest.mark.parametrize("task", ["sod", "sis", "cosod", None])
def test_allow_empty_accepts_an_answer_without_expressions_and_nothing_else(task):
    for empty in ("<think>nothing stands out</think><answer></answer>", "<answer>\n </answer>\n"):
        assert parse_answer(empty, task=task).problems == [NO_EXPRESSION]
        parsed = parse_answer(empty, task=task, allow_empty=True)
        assert parsed.ok and parsed.regions == parsed.instances == []
    assert parse_answer("<think>x</think><answer></answer>", allow_empty=True).think == "x"
    # Only the missing expression is forgiven: empty tags, stray text, an unclosed answer stay problems.
    for text, problem in [
        ("<answer><rg> </rg></answer>", "empty <rg>"),
        ("<answer>nothing</answer>", "text inside <answer> outside <rg>/<ins>"),
        ("<answer>", "unclosed <answer>"),
        ("<think>x</think>", "missing <answer>"),
    ]:
        assert parse_answer(text, task=task, allow_empty=True).problems == [problem]


def test_nested_expressions_are_not_returned():
    parsed = parse_answer("<answer><rg>a<rg>b</rg></rg></answer>")
    assert parsed.regions == []


def test_limits_drop_extra_and_long_expressions_before_segmentation():
    limits = TagLimits(max_expressions=2, max_expression_chars=5)
    text = format_answer(regions=["one", "far too long", "two", "three"])
    parsed = parse_answer(text, task="sod", limits=limits)
    assert parsed.regions == ["one", "two"]
    assert "expression longer than 5 characters" in parsed.problems
    assert "more than 2 expressions" in parsed.problems


def test_unknown_task_and_bad_limits_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'seg'"):
        parse_answer(WELL_FORMED, task="seg")
    with pytest.raises(ValueError, match="max_expressions"):
        TagLimits(max_expressions=0)


def test_non_text_answer_is_a_problem_not_an_exception():
    parsed = parse_answer(None)  # type: ignore[arg-type]
    assert parsed.problems == ["answer is NoneType, not text"]


def test_format_answer_matches_the_documented_layout():
    assert format_answer("why", regions=[" the red circle "]) == WELL_FORMED.replace("a red circle stands out", "why")
    assert format_answer(instances=["a", "b"]) == "<answer><ins>a</ins><ins>b</ins></answer>"


def test_format_answer_rejects_text_that_cannot_round_trip():
    with pytest.raises(ValueError, match="contains the tag '</rg>'"):
        format_answer(regions=["a</rg>b"])
    with pytest.raises(ValueError, match="region expression is empty"):
        format_answer(regions=["  "])
    with pytest.raises(TypeError, match="not a single string"):
        format_answer(regions="the dog")


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30).filter(
    lambda s: "<" not in s or not any(f"<{t}>" in s or f"</{t}>" in s for t in ("think", "answer", "rg", "ins"))
)
_expression = _text.map(str.strip).filter(bool).filter(lambda s: len(s) <= 200)


@settings(max_examples=200, deadline=None)
@given(
    think=st.one_of(st.none(), _text.map(str.strip)),
    expressions=st.lists(_expression, min_size=0, max_size=6),
    tag=st.sampled_from(["rg", "ins"]),
)
def test_round_trip(think, expressions, tag):
    """Exact on every well-formed answer, the empty one ("nothing is salient") included when it is allowed."""
    regions, instances = (expressions, []) if tag == "rg" else ([], expressions)
    text = format_answer(think, regions, instances)
    parsed = parse_answer(text, task="sod" if tag == "rg" else "sis", allow_empty=True)
    assert parsed.ok, parsed.problems
    assert (parsed.think, parsed.regions, parsed.instances) == (think, regions, instances)
    assert format_answer(parsed.think, parsed.regions, parsed.instances) == text


_pieces = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "<rg>", "</rg>", "<ins>", "</ins>", "<", ">", "</", " ", "x"]
)


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=25),
    task=st.sampled_from([None, "sod", "sis", "cosod"]),
)
def test_adversarial_strings_never_raise(pieces, task):
    limits = TagLimits(max_expressions=3, max_expression_chars=4)
    parsed = parse_answer("".join(pieces), task=task, limits=limits)
    assert len(parsed.regions) + len(parsed.instances) <= 3
    assert all(0 < len(e) <= 4 for e in parsed.regions + parsed.instances)
    assert parsed.ok == (not parsed.problems)
    if task is not None and parsed.ok:
        assert parsed.instances if task == "sis" else parsed.regions
    relaxed = parse_answer("".join(pieces), task=task, limits=limits, allow_empty=True)
    assert relaxed.problems == [p for p in parsed.problems if p != NO_EXPRESSION]
    assert (relaxed.think, relaxed.regions, relaxed.instances) == (parsed.think, parsed.regions, parsed.instances)

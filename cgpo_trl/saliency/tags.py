"""Read and write the Saliency-R1 answer format.

```
<think>free text</think><answer><rg>the red circle</rg></answer>                                 SOD, CoSOD
<think>free text</think><answer><ins>the red circle</ins><ins>the blue square</ins></answer>     SIS
```

Model output is untrusted: `parse_answer` never raises on it. It returns the expressions it could read together
with the list of problems it found, so a reward can price malformed answers and nothing over the configured
limits ever reaches a segmenter. `format_answer` is its inverse on well-formed answers.

An `<answer></answer>` without expressions is the answer "nothing is salient". Whether it is well-formed depends on
the reader, so `parse_answer` asks: with `allow_empty=True` (how rewards and prediction read answers) it is, otherwise
it carries the problem `NO_EXPRESSION`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# The tag each task answers with: region-level expressions for SOD / CoSOD, instance-level ones for SIS.
TASK_TAGS: dict[str, str] = {"sod": "rg", "sis": "ins", "cosod": "rg"}

_TAG = re.compile(r"<(/?)(think|answer|rg|ins)>")
_EXPRESSION_TAGS = ("rg", "ins")

NO_EXPRESSION = "no expression in <answer>"
"""The problem of a closed `<answer>` that holds no expression, unless `parse_answer` is given `allow_empty=True`."""


@dataclass(frozen=True)
class TagLimits:
    """Bounds applied while parsing, before any expression reaches a segmenter."""

    max_expressions: int = 16
    """Most `<rg>` + `<ins>` expressions kept from one answer; the rest are dropped and reported."""
    max_expression_chars: int = 200
    """Longest expression kept (characters, after stripping); longer ones are dropped and reported."""

    def __post_init__(self):
        if self.max_expressions < 1:
            raise ValueError(f"TagLimits.max_expressions must be >= 1, got {self.max_expressions}")
        if self.max_expression_chars < 1:
            raise ValueError(f"TagLimits.max_expression_chars must be >= 1, got {self.max_expression_chars}")


@dataclass
class ParsedAnswer:
    """What `parse_answer` could read. `problems` is empty exactly when the answer is well-formed."""

    think: str | None = None
    regions: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Open:
    name: str
    content_start: int
    placed: bool  # the tag sits where the format allows it
    clean: bool = True  # no other tag occurred inside it


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASK_TAGS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_TAGS)}")


def parse_answer(
    text: str, task: str | None = None, limits: TagLimits | None = None, *, allow_empty: bool = False
) -> ParsedAnswer:
    """Parse one completion. With `task`, an expression tag other than the task's (see `TASK_TAGS`) is a problem.

    Expressions and the think text are returned stripped of surrounding whitespace. Whitespace is allowed between
    blocks and after `</answer>`; any other text outside the tags is a problem. `allow_empty=True` accepts an
    `<answer>` without expressions ("nothing is salient"); an empty `<rg></rg>` / `<ins></ins>` stays a problem.
    """
    _check_task(task)
    limits = limits or TagLimits()
    result = ParsedAnswer()
    if not isinstance(text, str):
        result.problems.append(f"answer is {type(text).__name__}, not text")
        return result

    problems: dict[str, None] = {}  # ordered set: report each kind of problem once
    stack: list[_Open] = []
    seen_think = seen_answer = answer_closed = False
    expressions: list[tuple[str, str]] = []  # (tag, stripped content) in reading order
    position = 0

    def note_text(segment: str) -> None:
        # Text inside <think>, <rg> or <ins> is content; elsewhere only whitespace is allowed.
        if not segment.strip():
            return
        if not stack:
            problems["text after </answer>" if answer_closed else "text outside tags"] = None
        elif stack[-1].name == "answer":
            problems["text inside <answer> outside <rg>/<ins>"] = None

    for match in _TAG.finditer(text):
        closing, name = match.group(1) == "/", match.group(2)
        note_text(text[position : match.start()])
        position = match.end()
        if stack and stack[-1].name != "answer" and not (closing and stack[-1].name == name):
            stack[-1].clean = False
        if not closing:
            parent = stack[-1].name if stack else None
            if name == "think":
                placed = parent is None and not seen_think and not seen_answer
                if parent is not None:
                    problems[f"<think> inside <{parent}>"] = None
                elif seen_think:
                    problems["more than one <think>"] = None
                elif seen_answer:
                    problems["<think> after <answer>"] = None
                seen_think = True
            elif name == "answer":
                placed = parent is None and not seen_answer
                if parent is not None:
                    problems[f"<answer> inside <{parent}>"] = None
                elif seen_answer:
                    problems["more than one <answer>"] = None
                seen_answer = True
            else:
                placed = parent == "answer"
                if parent is None:
                    problems[f"<{name}> outside <answer>"] = None
                elif parent != "answer":
                    problems[f"<{name}> nested inside <{parent}>"] = None
            stack.append(_Open(name, match.end(), placed))
            continue
        if not any(entry.name == name for entry in stack):
            problems[f"stray </{name}>"] = None
            continue
        while stack[-1].name != name:
            problems[f"unclosed <{stack.pop().name}>"] = None
        entry = stack.pop()
        content = text[entry.content_start : match.start()].strip()
        if not (entry.placed and entry.clean):
            continue
        if name == "think":
            result.think = content
        elif name == "answer":
            answer_closed = True
        elif content:
            expressions.append((name, content))
        else:
            problems[f"empty <{name}>"] = None
    note_text(text[position:])
    for entry in reversed(stack):
        problems[f"unclosed <{entry.name}>"] = None

    if not seen_answer:
        problems["missing <answer>"] = None
    used = {tag for tag, _ in expressions}
    if task is not None:
        for tag in sorted(used - {TASK_TAGS[task]}):
            problems[f"<{tag}> in a {task} answer (expects <{TASK_TAGS[task]}>)"] = None
    elif len(used) > 1:
        problems["mixes <rg> and <ins>"] = None
    if (
        not allow_empty
        and seen_answer
        and answer_closed
        and not expressions
        and not any(p.startswith("empty") for p in problems)
    ):
        problems[NO_EXPRESSION] = None

    too_long = [content for _, content in expressions if len(content) > limits.max_expression_chars]
    if too_long:
        problems[f"expression longer than {limits.max_expression_chars} characters"] = None
        expressions = [(tag, content) for tag, content in expressions if len(content) <= limits.max_expression_chars]
    if len(expressions) > limits.max_expressions:
        problems[f"more than {limits.max_expressions} expressions"] = None
        expressions = expressions[: limits.max_expressions]

    result.regions = [content for tag, content in expressions if tag == "rg"]
    result.instances = [content for tag, content in expressions if tag == "ins"]
    result.problems = list(problems)
    return result


def format_answer(think: str | None = None, regions: Sequence[str] = (), instances: Sequence[str] = ()) -> str:
    """Write an answer that `parse_answer` reads back unchanged (texts are stripped; regions come before instances).
    Without expressions it writes `<answer></answer>`, which reads back well-formed with `allow_empty=True`.

    Raises `ValueError` for text that could not round-trip: an empty expression or one containing a tag.
    """
    if isinstance(regions, str) or isinstance(instances, str):
        raise TypeError("regions and instances are sequences of expressions, not a single string")
    parts = []
    if think is not None:
        parts.append(f"<think>{_clean(think, 'think text', allow_empty=True)}</think>")
    body = "".join(f"<rg>{_clean(text, 'region expression')}</rg>" for text in regions)
    body += "".join(f"<ins>{_clean(text, 'instance expression')}</ins>" for text in instances)
    parts.append(f"<answer>{body}</answer>")
    return "".join(parts)


def _clean(text: str, what: str, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    tag = _TAG.search(text)
    if tag:
        raise ValueError(f"{what} {text!r} contains the tag {tag.group(0)!r}")
    text = text.strip()
    if not text and not allow_empty:
        raise ValueError(f"{what} is empty")
    return text

"""Finding the question's words: the two options in their "X or Y" slot, and the objects' names.

Pure text functions (no tokenizer); each returns a character span and the rule that found it, so that a data set
can be audited (see ``make check-data``).
"""

from __future__ import annotations

import re

from mmflow.errors import MmflowError

#: Irregular plurals of GQA object names (singular -> plural).
IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "person": "people",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "mouse": "mice",
    "goose": "geese",
    "leaf": "leaves",
    "knife": "knives",
    "shelf": "shelves",
    "wolf": "wolves",
    "calf": "calves",
    "half": "halves",
    "loaf": "loaves",
    "ox": "oxen",
    "cactus": "cacti",
    "fish": "fish",
    "sheep": "sheep",
    "deer": "deer",
    "glasses": "glasses",
    "jeans": "jeans",
    "pants": "pants",
    "shorts": "shorts",
}
#: Words that may stand between "or" and the second option ("left or to the right", "dry or maybe wet", "short or
#: is it tall").
_SLOT_FILLERS = r"(?:(?:to|the|a|an|on|in|at|of|maybe|is|are|was|were|it|they|that|this|these|those)\s+){0,3}"

Span = tuple[int, int]
#: The slot rules, strictest first: (options may be sub-words, options may head a longer phrase, rule name).
SLOT_RULES = ((False, False, "or-slot"), (True, False, "or-slot (sub-word)"), (False, True, "or-slot (phrase)"))


def find_span(text: str, phrase: str, start: int = 0, end: int | None = None, prefix: bool = False) -> Span:
    """Character span of the first whole-word occurrence of ``phrase`` in ``text[start:end]`` (case-insensitive).

    With ``prefix`` the match may continue into a longer word (``circle`` matches ``circles``).

    Raises:
        MmflowError: if there is no such occurrence.

    Example:
        >>> find_span("Are there circles or squares?", "circle", prefix=True), find_span("a red or blue car", "Blue")
        ((10, 17), (9, 13))
    """
    tail = r"\w*" if prefix else r"(?!\w)"
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + tail, re.IGNORECASE)
    match = pattern.search(text, start, len(text) if end is None else end)
    if match is None:
        raise MmflowError(f"'{phrase}' not found in {text[start:end]!r}")
    return match.span()


def _word(phrase: str, sub_word: bool) -> str:
    body = re.escape(phrase.strip())
    return rf"\w*{body}\w*" if sub_word else rf"(?<!\w){body}(?!\w)"


def locate_options(
    text: str, first: str, second: str, start: int = 0, end: int | None = None
) -> tuple[Span, Span, str]:
    """The spans of two options where the question offers them: the "X or Y" slot, in either order.

    An option that is a sub-word of the question's word ("phone" in "telephone") is matched inside that word, and
    one that heads a longer phrase ("the cap of man or the dress", "the vest or the man hat") within it.

    Returns:
        ``(span of first, span of second, rule)``, rule one of :data:`SLOT_RULES`.

    Raises:
        MmflowError: if the question has no such slot.

    Example:
        >>> text = "Is the red car red or blue?"
        >>> s1, s2, rule = locate_options(text, "red", "blue")
        >>> text[slice(*s1)], text[slice(*s2)], rule, s1
        ('red', 'blue', 'or-slot', (15, 18))
        >>> text = "Is the surfer to the left or to the right of the surfboard?"
        >>> [text[slice(*s)] for s in locate_options(text, "right", "left")[:2]]
        ['right', 'left']
        >>> locate_options("Is it a telephone or a laptop?", "phone", "laptop")[2]
        'or-slot (sub-word)'
        >>> text = "Is the fence short or is it tall?"
        >>> [text[slice(*s)] for s in locate_options(text, "tall", "short")[:2]]
        ['tall', 'short']
        >>> text = "Which type of clothing is made of leather, the vest or the man hat?"
        >>> [text[slice(*s)] for s in locate_options(text, "vest", "hat")[:2]], locate_options(text, "vest", "hat")[2]
        (['vest', 'hat'], 'or-slot (phrase)')
    """
    end = len(text) if end is None else end
    for sub_word, phrase, rule in SLOT_RULES:
        extra = r"(?:\s+\w+){0,2}" if phrase else ""  # "the cap of man or the dress", "the vest or the man hat"
        before = r"(?:\w+\s+){0,2}" if phrase else ""
        for a, b, swap in ((first, second, False), (second, first, True)):
            pattern = rf"({_word(a, sub_word)}){extra}[ ,]*\bor\s+{_SLOT_FILLERS}{before}({_word(b, sub_word)})"
            matches = list(re.finditer(pattern, text[:end], re.IGNORECASE))
            matches = [m for m in matches if m.start() >= start]
            if matches:
                m = matches[-1]  # the slot is the last "X or Y" in the question
                spans = (m.span(2), m.span(1)) if swap else (m.span(1), m.span(2))
                return spans[0], spans[1], rule
    raise MmflowError(f"options {first!r} / {second!r} not found as 'X or Y' in {text[start:end]!r}")


def locate_object(text: str, name: str, start: int = 0, end: int | None = None) -> tuple[Span, str]:
    """The span of an object's name in the question, by the first rule that matches.

    Rules, in order: ``exact`` (the whole word or phrase), ``plural`` (+s / +es), ``irregular plural``
    (:data:`IRREGULAR_PLURALS`), ``prefix`` (a longer word starting with the name), ``sub-word`` (a longer word
    containing it).

    Raises:
        MmflowError: if no rule matches.

    Example:
        >>> text = "Is the skateboarder to the left of the skateboard?"
        >>> span, rule = locate_object(text, "skateboard")
        >>> text[slice(*span)], rule
        ('skateboard', 'exact')
        >>> cases = [("Any men?", "man"), ("Any boxes?", "box"), ("A doorway?", "door"), ("A telephone?", "phone")]
        >>> [locate_object(text, name)[1] for text, name in cases]
        ['irregular plural', 'plural', 'prefix', 'sub-word']
    """
    end = len(text) if end is None else end
    phrase = name.strip()
    words = phrase.split()
    irregular = IRREGULAR_PLURALS.get(words[-1].lower()) if words else None
    rules = [("exact", _word(phrase, False)), ("plural", rf"(?<!\w){re.escape(phrase)}(?:s|es)(?!\w)")]
    if irregular:
        rules.append(("irregular plural", _word(" ".join([*words[:-1], irregular]), False)))
    rules += [("prefix", rf"(?<!\w){re.escape(phrase)}\w+"), ("sub-word", rf"\w+{re.escape(phrase)}\w*")]
    for rule, pattern in rules:
        match = re.compile(pattern, re.IGNORECASE).search(text, start, end)
        if match:
            return match.span(), rule
    raise MmflowError(f"object {name!r} not found in {text[start:end]!r}")

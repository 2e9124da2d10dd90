"""The one condition form tables use, compiled to a Python predicate.

Grammar (keywords are case-insensitive; a leading IF is allowed and ignored):

    condition := term (OR term)*
    term      := factor (AND factor)*
    factor    := NOT factor | '(' condition ')' | test
    test      := PATH VALUED | PATH NOT VALUED
               | PATH EQUALS "text" | PATH NOT EQUALS "text"
               | PATH IN ("a", "b") | PATH NOT IN ("a", "b")
               | PATH LENGTH GREATER THAN n | PATH LENGTH LESS THAN n

PATH is a v2 location: `PID-7`, `PID-11.9`, `MSH-9.2` in segment tables, `CX.4`, `HD.3` in
data-type tables. Comparisons are on the unescaped value, exactly (case matters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.mapping.errors import ConditionError as ConditionError  # defined with the layer's root
from gateway.mapping.runtime import described

# Reads the value at a location for the message being translated.
Getter = Callable[[object], str]
Predicate = Callable[[object], bool]
GetterFactory = Callable[[str], Getter]

# A word may name a repetition (`OBX-5(2)`): digits in parentheses right after it.
_TOKEN = re.compile(
    r'\s*(?:(?P<string>"[^"]*")|(?P<punct>[(),])|(?P<word>[^\s(),"]+(?:\(\d+\)[^\s(),"]*)?))')


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ConditionError(f"cannot read the condition at '{text[position:][:20]}'")
        kind = match.lastgroup or "word"
        tokens.append(_Token(kind, match.group(kind)))
        position = match.end()
    return tokens


def paths_in(text: str) -> list[str]:
    """The v2 locations a condition reads (for table checks)."""
    return [t.text for t in tokenize(text) if t.kind == "word" and ("-" in t.text or
                                                                     "." in t.text)]


def compile_condition(text: str, getter_for: GetterFactory) -> Predicate:
    """A predicate for the condition; `getter_for` turns a location into a value reader."""
    tokens = tokenize(text)
    if tokens and tokens[0].text.upper() == "IF":
        tokens = tokens[1:]
    if not tokens:
        raise ConditionError("the condition is empty")
    parser = _Parser(tokens, getter_for)
    predicate = parser.condition()
    if parser.position != len(tokens):
        raise ConditionError(f"unexpected '{tokens[parser.position].text}'")
    return predicate


class _Parser:
    def __init__(self, tokens: list[_Token], getter_for: GetterFactory) -> None:
        self.tokens = tokens
        self.position = 0
        self.getter_for = getter_for

    def peek(self) -> str:
        if self.position < len(self.tokens):
            token = self.tokens[self.position]
            return token.text.upper() if token.kind == "word" else token.text
        return ""

    def take(self, expected: str | None = None) -> _Token:
        if self.position >= len(self.tokens):
            wanted = f" (expected {expected})" if expected else ""
            raise ConditionError(f"the condition ends early{wanted}")
        token = self.tokens[self.position]
        if expected is not None and (token.text.upper() if token.kind == "word"
                                     else token.text) != expected:
            raise ConditionError(f"expected {expected}, found '{token.text}'")
        self.position += 1
        return token

    def condition(self) -> Predicate:
        terms = [self.term()]
        while self.peek() == "OR":
            self.take()
            terms.append(self.term())
        if len(terms) == 1:
            return terms[0]
        if len(terms) == 2:
            first, second = terms
            return described(lambda ctx: first(ctx) or second(ctx), "or", terms)
        return described(lambda ctx: any(term(ctx) for term in terms), "or", terms)

    def term(self) -> Predicate:
        factors = [self.factor()]
        while self.peek() == "AND":
            self.take()
            if self.peek() == "IF":  # the Guide sometimes writes "... AND IF X ..."
                self.take()
            factors.append(self.factor())
        if len(factors) == 1:
            return factors[0]
        if len(factors) == 2:
            left, right = factors
            return described(lambda ctx: left(ctx) and right(ctx), "and", factors)
        return described(lambda ctx: all(factor(ctx) for factor in factors), "and", factors)

    def factor(self) -> Predicate:
        if self.peek() == "NOT":
            self.take()
            inner = self.factor()
            return described(lambda ctx: not inner(ctx), "not", inner)
        if self.peek() == "(":
            self.take()
            inner = self.condition()
            self.take(")")
            return inner
        return self.test()

    def test(self) -> Predicate:
        path = self.take()
        if path.kind != "word":
            raise ConditionError(f"expected a v2 location, found '{path.text}'")
        get = self.getter_for(path.text)
        negate = False
        if self.peek() == "IS":
            self.take()
        if self.peek() == "NOT":
            self.take()
            negate = True
        word = self.peek()
        test: Predicate
        if word == "VALUED":
            self.take()
            test = described(lambda ctx: get(ctx) != "", "valued", get)
        elif word == "EQUALS":
            self.take()
            expected = self.string()
            test = described(lambda ctx: get(ctx) == expected, "equals", get, expected)
        elif word == "IN":
            self.take()
            options = frozenset(self.strings())
            test = described(lambda ctx: get(ctx) in options, "in", get, options)
        elif word == "LENGTH":
            self.take()
            direction = self.take().text.upper()
            self.take("THAN")
            bound = self.number()
            if direction == "GREATER":
                test = described(lambda ctx: len(get(ctx)) > bound, "longer", get, bound)
            elif direction == "LESS":
                test = described(lambda ctx: len(get(ctx)) < bound, "shorter", get, bound)
            else:
                raise ConditionError(f"expected GREATER or LESS, found '{direction}'")
        else:
            raise ConditionError(
                f"expected VALUED, EQUALS, IN or LENGTH after {path.text}, found '{word}'")
        if negate:
            positive: Predicate = test
            return described(lambda ctx: not positive(ctx), "not", positive)
        return test

    def string(self) -> str:
        token = self.take()
        if token.kind != "string":
            raise ConditionError(f'expected a "quoted" value, found \'{token.text}\'')
        return token.text[1:-1]

    def strings(self) -> list[str]:
        self.take("(")
        values = [self.string()]
        while self.peek() == ",":
            self.take()
            values.append(self.string())
        self.take(")")
        return values

    def number(self) -> int:
        token = self.take()
        if not token.text.isdigit():
            raise ConditionError(f"expected a number, found '{token.text}'")
        return int(token.text)

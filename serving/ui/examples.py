"""What each bundled /ui example claims about the service's answer, and whether an answer bears
it out.

A demo example is only honest if the service really does on it what its caption says. So the
examples are not labelled by how they were made (clean or attacked) alone but by a role, a claim
about the served answer: bench/ui_examples.py runs the served engine on candidate images and
keeps, per role, a candidate whose answers fit it (`choose`); the tests run the engine again on
the shipped files and check every claim with the same `fits`. Answers are ClassifyResult dicts,
as POST /classify returns them. Pure functions, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Answer = dict[str, Any]  # a ClassifyResult as JSON

# role -> the short title the page shows; in the order `choose` fills them.
ROLES: dict[str, str] = {
    "clean": "clean, answered",
    "caught": "caught attack",
    "missed": "missed attack",
    "abstained": "abstention",
    "false-alarm": "false alarm",
}
# The roles every regeneration must find: the detector's hit and miss, a plain correct answer
# and an abstention. A false alarm is shown too when the candidates hold one.
REQUIRED = ("clean", "caught", "missed", "abstained")


def correct(example: dict[str, Any], answer: Answer) -> bool:
    return answer["class_name"] == example["true_class"]


def _suspicious(answer: Answer) -> bool:
    return bool(answer["detection"]["suspicious"])


_CLAIMS: dict[str, Callable[[dict[str, Any], Answer, Answer], bool]] = {
    # a clean image answered right, not flagged, and answered at the example coverage too
    "clean": lambda ex, a, c: (not ex["attacked"] and correct(ex, a) and not _suspicious(a)
                               and not c["abstained"]),
    # an attack that fooled the classifier and was flagged
    "caught": lambda ex, a, c: ex["attacked"] and not correct(ex, a) and _suspicious(a),
    # an attack that fooled the classifier and was not flagged
    "missed": lambda ex, a, c: ex["attacked"] and not correct(ex, a) and not _suspicious(a),
    # the service abstains on it at the example coverage
    "abstained": lambda ex, a, c: bool(c["abstained"]),
    # a clean image answered right, yet flagged
    "false-alarm": lambda ex, a, c: not ex["attacked"] and correct(ex, a) and _suspicious(a),
}


def fits(role: str, example: dict[str, Any], answer: Answer, at_coverage: Answer) -> bool:
    """Whether the service's answers on `example` bear out `role`.

    `example` needs `attacked` and `true_class`; `answer` is the default request's (coverage 1,
    what the page sends with the coverage field empty), `at_coverage` the answer at the
    example coverage (bench/ui_examples.py --coverage).
    """
    if role not in _CLAIMS:
        raise ValueError(f"unknown example role {role!r}; known: {list(_CLAIMS)}")
    return _CLAIMS[role](example, answer, at_coverage)


def roles_of(example: dict[str, Any], answer: Answer, at_coverage: Answer) -> list[str]:
    """Every role the answers on `example` fit, in ROLES order."""
    return [r for r in ROLES if fits(r, example, answer, at_coverage)]


def _preference(role: str, example: dict[str, Any], answer: Answer) -> tuple[int, ...]:
    """Lower is shown first among the candidates fitting `role`. An abstention is most telling
    where the best guess it withholds is wrong, and clearest on a clean image."""
    if role == "abstained":
        return (int(correct(example, answer)), int(example["attacked"]))
    return ()


def choose(candidates: Iterable[tuple[dict[str, Any], Answer, Answer]],
           roles: Sequence[str] = tuple(ROLES)) -> dict[str, int]:
    """role -> index into `candidates` of the example to show for it (roles no candidate fits
    are left out). No candidate serves two roles; among those fitting a role, the first in the
    candidates' order wins after `_preference`."""
    items = list(candidates)
    chosen: dict[str, int] = {}
    for role in roles:
        fitting = [i for i, (ex, a, c) in enumerate(items)
                   if i not in chosen.values() and fits(role, ex, a, c)]
        if fitting:
            chosen[role] = min(fitting, key=lambda i: (_preference(role, items[i][0],
                                                                  items[i][1]), i))
    return chosen

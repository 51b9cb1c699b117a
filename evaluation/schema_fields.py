"""What the `deqguard eval` report's models share: the strict base and the fields that mean the
same thing in more than one part, so the parts' schemas (schema.py, adaptive_selective_schema.py,
slowdown_schema.py) cannot drift apart on them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from deqguard.models.selective import SCORE_NAMES


class StrictModel(BaseModel):
    """A report model that refuses unknown keys: a misspelt field is an error, never dropped."""

    model_config = ConfigDict(extra="forbid")


# A bootstrap 95% interval [low, high]; None where the rate is undefined (nothing to resample).
Interval = list[float] | None
BootstrapReps = Annotated[int, Field(ge=1, description="bootstrap resamples")]
# The doubt scores a part works on, every score unless narrowed; each field says what is done.
DoubtScores = Annotated[list[str], Field(default_factory=lambda: list(SCORE_NAMES))]
# The folder both selective parts cache their crafted sets in (--selective-cache).
SetsCache = Annotated[str | None, Field(description="folder of the crafted attacked sets "
                                        "(resumable); None: not cached")]
# Per image of the evaluated ones, in order, '1' where the model was right (evaluation.per_sample):
# what lets two reports on the same images be compared pairwise (`deqguard compare`). None in
# reports written before it was recorded.
PerImage = Annotated[str | None, Field(None, pattern="^[01]*$", description="per image, in "
                                       "order: '1' right, '0' wrong (paired comparisons)")]

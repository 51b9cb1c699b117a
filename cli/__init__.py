"""deqguard: adversarially robust Deep Equilibrium classifiers.

The package root only carries the version and the `deqguard` command; the work lives in
`deqguard.models`, `deqguard.training`, `deqguard.serving` and `deqguard.clients`.
"""

__version__ = "0.1.0"

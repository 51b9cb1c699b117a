"""deqguard: adversarially robust Deep Equilibrium classifiers.

The package root only carries the version, the `deqguard` command (`cli`), the root of the
intentional errors (`errors`), atomic file writes (`fileio`) and the names of the checkpoints
shipped inside it (`shipped`): the few things every part imports. The work lives in
`deqguard.models`, `deqguard.training`, `deqguard.evaluation`, `deqguard.serving` and
`deqguard.clients`, each in a top-level folder of its own (`models/`, `training/`, ...; mapped in
pyproject.toml's `package-dir`), so the repository reads as the design card draws it while this
folder bears the import name.
"""

__version__ = "0.1.0"

"""The two kinds of failure a person running pv-ray acts on, as opposed to bugs.

- `InputError`: something the user gave cannot be used (a config key, a model folder, an
  identity id, a photo folder, a request). The CLI prints its message on one line and exits 2.
- `TuningFailed`: an identity's tuning ran but produced no usable adapter (it diverged, or it had
  no training signal). Nothing is stored; the CLI exits 1 and the batch records the reason.

Anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Unusable input; the message says which and why."""


class TuningFailed(RuntimeError):
    """An identity's tuning produced no usable adapter; the message says at which step and why."""

"""`safactory eval compare A B`: two evaluations side by side, with a paired test on their shared tasks.

The comparison itself lives in the data layer (`safactory.data.comparison`), where `safactory view`
reads it too; this module keeps the names the eval command and its tests import.
"""

from __future__ import annotations

from safactory.data.comparison import compare, load_eval, sign_test

__all__ = ["compare", "load_eval", "sign_test"]

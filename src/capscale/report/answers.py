"""The verdict helpers under their former names, for section modules written against them.

The verdicts themselves live in their sections (``capscale.report.sections``); new code imports
``capscale.report.verdicts``.
"""

from capscale.report.verdicts import (  # noqa: F401
    NOT_MEASURED,
    NOT_RESOLVED,
    QUESTIONS,
    RESOLVED,
    excludes,
    f2,
    iv,
    needed,
    power_clause,
    within_cells,
)
from capscale.report.verdicts import answer_for as _answer  # noqa: F401
from capscale.report.verdicts import contrasts as _contrasts  # noqa: F401
from capscale.report.verdicts import fittable as _fittable  # noqa: F401
from capscale.report.verdicts import ok as _ok  # noqa: F401
from capscale.report.verdicts import pooled as _pooled  # noqa: F401
from capscale.report.verdicts import pooled_clause as _pooled_clause  # noqa: F401
from capscale.report.verdicts import span as _span  # noqa: F401

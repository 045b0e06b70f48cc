"""Budget-driven optimization: the most accurate model that meets a measured
latency budget on this device, with the evidence (rtjax.optimize.search).
Importing the package registers the `optimize` stage type."""

from rtjax.optimize import stage  # noqa: F401  (registers the stage type)
from rtjax.optimize.search import BudgetNotMet, run_search
from rtjax.optimize.settings import Settings
from rtjax.optimize.stats import compare_to_reference, mcnemar, wilson_interval

__all__ = ["BudgetNotMet", "Settings", "compare_to_reference", "mcnemar",
           "run_search", "wilson_interval"]

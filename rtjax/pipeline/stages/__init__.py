"""The stage types; importing this package registers each of them."""

from rtjax.pipeline.stages import (distill, int8, prune, qat,  # noqa: F401
                                   structured_prune, train)

"""Checks on what a model returns, before a service answers with it or stores it.

Input validation (:mod:`dramaturg.shared.audio`) refuses NaN, Inf and absurd amplitudes, yet a model
can still produce a non-finite output: broken weights (a diverged training run that was published),
a numerics bug, an input pattern validation did not foresee. A NaN embedding is worse than an error:
it compares as "no match" with everything, and an enrolled NaN voice silently poisons every later
Identify. :func:`require_finite` turns that into an error the caller and the operator both see.

The code is INTERNAL, not INVALID_ARGUMENT or FAILED_PRECONDITION, on purpose. The request passed
validation, so blaming it (INVALID_ARGUMENT) would send the client looking for a bug it does not
have; FAILED_PRECONDITION says "the system is not in a state for this call, fix that and retry",
which a client cannot do for a broken model. INTERNAL is gRPC's code for "an invariant the server
relies on is broken" and is not retried by default. The message still says what happened, that
nothing was stored, and what to try (another model version); the error is logged at ERROR so the
operator sees it even though the interceptor logs ServiceErrors at INFO.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
from dramaturg.shared.grpc.errors import ServiceError

__all__ = ["NON_FINITE_OUTPUT", "require_finite"]

log = logging.getLogger(__name__)

#: ErrorInfo reason of the error :func:`require_finite` raises.
NON_FINITE_OUTPUT = "NON_FINITE_OUTPUT"


def require_finite(values: np.ndarray | Sequence[float], what: str, *, model: str = "") -> np.ndarray:
    """Return ``values`` as an array if every element is finite; else raise INTERNAL (see the module).

    ``what`` names the output in the message ("the embeddings of audio[0..2]"), ``model`` the model
    ref that produced it, so the operator knows which version to pull.
    """
    array = np.asarray(values)
    if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
        return array
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    by = f" by model {model}" if model else ""
    log.error("non-finite output: %s%s has %d NaN/Inf of %d values", what, by, bad, array.size)
    raise ServiceError(
        grpc.StatusCode.INTERNAL,
        f"{what} came out non-finite ({bad} of {array.size} values NaN or Inf){by} although the input "
        "passed validation, so nothing was returned or stored; the model or its numerics are broken: "
        "try another model version and tell the operator",
        reason=NON_FINITE_OUTPUT,
        metadata={"model": model} if model else {},
    )

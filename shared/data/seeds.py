"""The seed contract of the synthetic corpus: one key per kind of random decision.

Every random choice draws from ``np.random.default_rng([seed, TAG, index…])`` keyed by what it decides
(a scene, a speaker, a clip), never from a shared stream. So results do not depend on thread timing or
on which writers run, and adding scenes to one split leaves the others unchanged. The values are part
of the corpus's identity: changing one changes every corpus built from a given seed (and every figure
measured on one), which is why they live here, together, and nowhere else.
"""

from __future__ import annotations

import numpy as np

# Tags: the first key after the seed.
SCENE = 2001
"""A scene's cast, setting and who speaks which line (plan)."""
SCENE_ACTING = SCENE + 100
"""The acting of a scene's lines (plan)."""
PLACE = 2002
"""Gaps and overlaps when a scene's turns are laid on its timeline (mixdown)."""
UTT = 3001
"""A speaker's sessions, lines and acting for the speaker corpus (plan)."""
ENROLL = 4001
"""A speaker's enrollment lines and their acting (plan)."""
NOISE = 5001
"""Background noise; the second key says what it is added to (``NOISE_*``)."""
RATER = 6001
"""Evaluator rater noise; the second key says for which items (``RATER_*``)."""
TRIALS = 7001
"""The speaker-verification trial list (VoxCeleb writer)."""

# Second keys under NOISE.
NOISE_SCENE, NOISE_ROLE, NOISE_SESSION, NOISE_ENROLL = 1, 2, 3, 4
# Second keys under RATER.
RATER_BIAS, RATER_REALISM, RATER_ARCHETYPE = 0, 1, 2


def rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for one decision, keyed by the corpus seed and what it decides."""
    return np.random.default_rng([seed, *keys])

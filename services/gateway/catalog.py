"""Every pipeline the gateway offers, by name (``ListPipelines``, ``SubmitJob``)."""

from __future__ import annotations

from dramaturg.services.gateway.casting import CAST_VOICES
from dramaturg.services.gateway.pipelines import ANALYZE_SCENE, IDENTIFY_LINES, PROBE, PipelineSpec
from dramaturg.services.gateway.revoice import REVOICE_SCENE

PIPELINES: dict[str, PipelineSpec] = {
    p.name: p for p in (PROBE, IDENTIFY_LINES, ANALYZE_SCENE, REVOICE_SCENE, CAST_VOICES)
}

"""A gateway process for the replica tests: the real GatewayService with a slow test pipeline.

``python tests/replica_gateway.py --home H --store URL --port P --replica ID --lease S`` serves the
``slow`` pipeline: ``prepare`` (quick), ``long`` (``--ticks`` steps of 0.1 s, each reported as
progress), ``finish`` (quick). Each stage appends what it did and which gateway did it to ``runs.txt``
in the job's folder (the folder the replicas share), so a test can tell what ran twice and what once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.pipelines import PipelineSpec, StageContext, StageSpec
from dramaturg.services.gateway.server import GatewayService
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.service import run_service

TOKEN = "test-token"


def record(ctx: StageContext, line: str) -> None:
    with (ctx.work_dir / "runs.txt").open("a") as out:
        out.write(line + "\n")


def slow_pipeline(replica: str, ticks: int) -> PipelineSpec:
    async def prepare(ctx: StageContext) -> dict:
        record(ctx, f"prepare {replica}")
        return {"by": replica}

    async def long(ctx: StageContext) -> dict:
        record(ctx, f"long-start {replica}")
        for tick in range(ticks):
            await asyncio.sleep(0.1)
            await ctx.report((tick + 1) / ticks, f"tick {tick + 1}/{ticks}")
        record(ctx, f"long-end {replica}")
        return {"by": replica, "ticks": ticks}

    async def finish(ctx: StageContext) -> dict:
        record(ctx, f"finish {replica}")
        return {"by": replica}

    return PipelineSpec(
        name="slow",
        description="three stages, the middle one slow (replica tests)",
        stages=(
            StageSpec("prepare", prepare, service="gateway"),
            StageSpec("long", long, service="gateway", depends_on=("prepare",)),
            StageSpec("finish", finish, service="gateway", depends_on=("long",)),
        ),
        result=lambda outputs: {name: out["by"] for name, out in outputs.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--lease", type=float, default=1.5)
    parser.add_argument("--ticks", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = GatewaySettings(
        api_token=TOKEN, job_store=args.store, replica_id=args.replica, lease_seconds=args.lease,
        retry_base_seconds=0.05, server=ServerSettings(port=args.port, drain_notice_seconds=0.0),
    )
    service = GatewayService(settings, home=args.home,
                             pipelines={"slow": slow_pipeline(args.replica, args.ticks)})
    asyncio.run(run_service(service, settings.server))


if __name__ == "__main__":
    main()

"""Toy recipes for the training-runner tests only (imported by the worker subprocess by import path).

``toy-linear`` fits y = 3x + 1 with SGD + momentum on torch autograd: small enough to finish in a
second, real enough to exercise checkpoints (model + trainer state), resume, cancel and publishing.
It sleeps a little per step so that a test can kill it mid-run. The update is written out rather
than taken from ``torch.optim`` because constructing a torch optimizer imports torch._dynamo, which
costs seconds per worker on a slow core. torch is imported inside ``run`` so that importing this
module (in the server, to validate requests) stays cheap.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from dramaturg.shared.training import TRAINER_STATE_DIR, Recipe, RunContext


def _write_model(model: Any, folder: Path) -> None:
    import torch

    torch.save(model.state_dict(), folder / "model.pt")
    weight, bias = float(model.weight.item()), float(model.bias.item())
    (folder / "config.json").write_text(json.dumps({"weight": weight, "bias": bias}))


class LinearToy(Recipe):
    name = "toy-linear"
    description = "fit y = 3x + 1 with SGD (tests only)"
    architecture = "linear-1x1"
    defaults = {"steps": 40, "lr": 0.2, "momentum": 0.5, "batch_size": 32, "checkpoint_every": 10,
                "sleep": 0.01, "steps_per_epoch": 20, "seed": 0}

    def run(self, ctx: RunContext) -> None:
        import torch

        cfg = ctx.config
        torch.manual_seed(cfg["seed"])
        model = torch.nn.Linear(1, 1)
        velocity = [torch.zeros_like(p) for p in model.parameters()]
        start = 0
        resume = ctx.latest_checkpoint()
        if resume is not None:
            folder, start, _epoch = resume
            model.load_state_dict(torch.load(folder / "model.pt"))
            velocity = torch.load(folder / TRAINER_STATE_DIR / "velocity.pt")
            ctx.log(f"toy: resumed at step {start}")
        generator = torch.Generator().manual_seed(cfg["seed"] + start)
        total = cfg["steps"]
        best = math.inf
        loss_value = math.nan

        def write_checkpoint(folder: Path) -> None:
            _write_model(model, folder)
            (folder / TRAINER_STATE_DIR).mkdir()
            torch.save(velocity, folder / TRAINER_STATE_DIR / "velocity.pt")

        for step in range(start + 1, total + 1):
            if ctx.cancelled():
                ctx.log(f"toy: stopping at step {step}", "WARNING")
                return
            x = torch.rand(cfg["batch_size"], 1, generator=generator) * 2 - 1
            loss = torch.nn.functional.mse_loss(model(x), 3 * x + 1)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for param, buf in zip(model.parameters(), velocity, strict=True):
                    buf.mul_(cfg["momentum"]).add_(param.grad)
                    param.sub_(cfg["lr"] * buf)
            loss_value = float(loss.item())
            epoch = step / cfg["steps_per_epoch"]
            ctx.report(step, total, epoch)
            ctx.log_metrics(step, epoch, {"loss/train": loss_value})
            if step % cfg["checkpoint_every"] == 0 or step == total:
                is_best = loss_value < best
                best = min(best, loss_value)
                ctx.save_checkpoint(write_checkpoint, step, epoch, {"loss/train": loss_value}, is_best)
            time.sleep(cfg["sleep"])
        ctx.publish(lambda folder: _write_model(model, folder), {"loss/train": loss_value})


class SleepyToy(Recipe):
    """Counts steps without torch (starts in well under a second): for cancel and crash tests.

    Checkpoints hold the step count as JSON; ``ignore_cancel`` makes it deaf to ``cancelled()`` so
    the runner has to escalate to SIGKILL.
    """

    name = "toy-sleep"
    description = "counts steps, sleeping between them (tests only)"
    defaults = {"steps": 100000, "sleep": 0.02, "checkpoint_every": 0, "ignore_cancel": False}

    def run(self, ctx: RunContext) -> None:
        cfg = ctx.config
        start = 0
        resume = ctx.latest_checkpoint()
        if resume is not None:
            start = json.loads((resume[0] / "state.json").read_text())["step"]
        for step in range(start + 1, cfg["steps"] + 1):
            if ctx.cancelled() and not cfg["ignore_cancel"]:
                return
            ctx.report(step, cfg["steps"])
            if cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0:
                state = json.dumps({"step": step})

                def write(folder: Path, state: str = state) -> None:
                    (folder / "state.json").write_text(state)

                ctx.save_checkpoint(write, step)
            time.sleep(cfg["sleep"])


class FailingToy(Recipe):
    name = "toy-fail"
    description = "raises at once (tests only)"
    defaults = {"message": "boom"}

    def run(self, ctx: RunContext) -> None:
        ctx.log("toy-fail: about to fail")
        raise ValueError(ctx.config["message"])


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (LinearToy(), SleepyToy(), FailingToy())}

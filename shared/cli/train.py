"""``dramaturg train SERVICE --config FILE``: fine-tune one service's model in the foreground.

The config names a recipe, a dataset and overrides::

    recipe: ecapa-aam
    dataset: ./data            # as written by `dramaturg data synth`, or your own data in that layout
    output_model: my-speaker   # model-store name the best checkpoint is published under
    overrides: {lr: 0.001, epochs: 5}

The run goes through the same runner the Training RPCs use (a worker subprocess, checkpoints, crash
resume, TensorBoard logs under $DRAMATURG_HOME/runs), with a progress bar; Ctrl-C cancels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml
from dramaturg.shared import registry
from dramaturg.shared.config import dramaturg_home

SYNTHETIC = "synthetic"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a service's model on your data")
    p.add_argument("service", choices=sorted({*registry.model_services(), *registry.PLANNED}))
    p.add_argument("--config", help="YAML: recipe, dataset, output_model, overrides")
    p.add_argument("--recipe", help="override the config's recipe")
    p.add_argument("--dataset", help="override the config's dataset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one recipe key")
    p.add_argument("--list-recipes", action="store_true", help="list the service's recipes and exit")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve the run's Prometheus metrics (dramaturg_training_*) on this port (0: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        path = registry.recipes_path(args.service)
    except registry.ServiceNotBuilt:
        print(
            f"dramaturg train: training for the {args.service} service is not built yet (README: status)",
            file=sys.stderr,
        )
        return 2
    from dramaturg.shared.store import ModelStore
    from dramaturg.shared.training.runner import TrainingRunner

    home = dramaturg_home()
    runner = TrainingRunner(home, args.service, path, ModelStore(home))
    if args.list_recipes:
        for name, recipe in sorted(runner.recipes().items()):
            print(f"{name:<20} {recipe.description}")
        return 0
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    overrides = dict(config.get("overrides") or {})
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"--set expects KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        overrides[key] = yaml.safe_load(value)
    recipe = args.recipe or config.get("recipe")
    dataset = args.dataset or config.get("dataset")
    if not recipe or not dataset:
        print(
            "dramaturg train: name a recipe and a dataset (in --config or with --recipe/--dataset); "
            f"recipes: {', '.join(sorted(runner.recipes()))}",
            file=sys.stderr,
        )
        return 2
    if dataset == SYNTHETIC:
        dataset = str(synthetic_dataset(home, config.get("synth") or {}))
    dataset = str(Path(dataset).expanduser().resolve())
    if args.metrics_port:
        from dramaturg.shared.metrics import start_metrics_server
        from dramaturg.shared.training.metrics import export_runner

        export_runner(runner)
        print(f"metrics on :{start_metrics_server(args.metrics_port)}/metrics")
    record = runner.run_inline(recipe, dataset, overrides, output_model=config.get("output_model", ""),
                               base_model=config.get("base_model") or None)
    runner.close()
    if record.state != "SUCCEEDED":
        return 1
    store = ModelStore(home)
    published = store.resolve(args.service, record.published_model) if record.published_model else None
    # the published model's own metrics (the best checkpoint's), not the run's latest values
    summary = outcome((published.metrics if published else {}) or record.metrics)
    if summary:
        print(f"{record.published_model or record.run_id}: {summary}")
    if published and servable(published.labels) and store.default(args.service) is None:
        store.set_default(args.service, record.published_model.partition(":")[0])
        print(f"{record.published_model} is now the {args.service} service's default model")
    return 0


def synthetic_dataset(home: Path, synth: dict) -> Path:
    """``dataset: synthetic`` in a recipe config: a corpus from ``synth:`` settings, made once and reused."""
    import hashlib
    import json

    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus

    config = SynthConfig(**synth)
    key = hashlib.sha256(json.dumps(config.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    out = home / "corpora" / f"synth-{key}"
    if not (out / "manifest.json").exists():
        print(f"generating a synthetic corpus in {out} ({config.num_speakers} speakers) …")
        started = time.monotonic()
        synthesize_corpus(out, config, overwrite=True)
        print(f"corpus ready in {time.monotonic() - started:.0f} s")
    return out


# What a finished run's metrics say, for the line after its progress bar (the bar hides the run's
# per-evaluation lines): held-out EER for a speaker model, dev/test DER for a diarization pipeline.
OUTCOME_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("eer", "held-out EER", True),
    ("min_dcf", "minDCF", False),
    ("der_dev_after", "dev DER", True),
    ("der_test", "test DER", True),
)


def outcome(metrics: dict[str, float]) -> str:
    """The run's headline figures (empty when it reported none of them)."""
    shown = [f"{label} {100 * metrics[key]:.1f} %" if percent else f"{label} {metrics[key]:.3f}"
             for key, label, percent in OUTCOME_METRICS if key in metrics]
    return ", ".join(shown)


# Store labels ``kind`` of versions a service cannot serve on their own (a TTS codec, a LoRA adapter a
# voice is made of): publishing one must not make it the service's default model.
PARTS = frozenset({"codec", "lora-adapter"})


def servable(labels: dict[str, str]) -> bool:
    """Whether a published version is a model its service serves (not one of its parts)."""
    return labels.get("kind", "model") not in PARTS

import argparse
import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.observability.capacity import Options, options_add, options_of
from apps.observability.capacity_inputs import CapacityError, bench_read
from apps.observability.scaling import Wave, result_json, result_text, simulate_wave
from apps.observability.scaling_manifests import cluster_read


class Command(BaseCommand):
    requires_system_checks = ()  # arithmetic on manifests and JSON files: no database
    help = "Replay a traffic wave through the production overlay's HPA, KEDA and Karpenter."

    def add_arguments(self, parser):
        base = settings.BASE_DIR
        parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True)
        parser.add_argument(
            "--manifests", type=Path, default=base / "deploy/k8s/overlays/production"
        )
        parser.add_argument("--karpenter", type=Path, default=base / "deploy/karpenter")
        parser.add_argument("--bench-dir", type=Path, default=base / "docs/benchmarks")
        parser.add_argument(
            "--json", type=Path, help="also write the result here (docs/benchmarks/wave.json)"
        )
        options_add(parser, Wave, Options)

    def handle(self, *args, **options):
        wave, chosen = options_of(Wave, options), options_of(Options, options)
        try:
            cluster = cluster_read(manifests=options["manifests"], karpenter=options["karpenter"])
            bench = bench_read(options["bench_dir"], p99_ms=chosen.p99_ms)
            result = simulate_wave(
                cluster=cluster, bench=bench, options=chosen, wave=wave, gpu=options["gpu"]
            )
        except CapacityError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(result_text(result))
        if options["json"]:
            options["json"].write_text(json.dumps(result_json(result, wave), indent=2) + "\n")

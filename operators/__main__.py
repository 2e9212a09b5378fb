"""`python -m amalia_operator`: run the ModelRollout operator (all namespaces unless narrowed)."""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from amalia_operator import kube
from amalia_operator.constants import PEERING_NAME, TICK_INTERVAL_S


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amalia-operator", description="Drive ModelRollout canaries on KubeRay RayServices."
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="Watch only this namespace (repeatable); default: all namespaces.",
    )
    parser.add_argument(
        "--peering",
        default=PEERING_NAME,
        help="kopf peering object shared by the replicas (default %(default)s).",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="Run without peering (a single replica, or local development).",
    )
    parser.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logs.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import amalia_operator.handlers  # noqa: F401  (registers the handlers with kopf)

    scope = ", ".join(args.namespace) if args.namespace else "all namespaces"
    logging.getLogger("amalia_operator").info(
        "starting: watching %s, tick %.1fs, %s",
        scope,
        TICK_INTERVAL_S,
        "standalone" if args.standalone else f"peering {args.peering!r}",
    )
    if not args.standalone:
        kube.ensure_peering(kube.custom_objects_api(), args.peering, args.namespace)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

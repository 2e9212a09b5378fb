"""`amalia-operator` (also `python -m amalia_operator`): run the ModelRollout operator, or steer a rollout.

    amalia-operator run [-n NS]... [--standalone] [--peering NAME] [--liveness URL] [-v]
    amalia-operator rollout status|promote|abort|retry NAME [-n NS]
"""

from __future__ import annotations

import argparse
import logging
import sys

from amalia_operator.constants import PEERING_NAME, TICK_INTERVAL_S


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amalia-operator",
        description="Drive ModelRollout canaries on KubeRay RayServices.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run the operator (all namespaces unless narrowed)"))
    # Listed for --help only: main() hands `rollout ...` to amalia_operator.cli, which owns its flags.
    sub.add_parser("rollout", help="inspect and steer a ModelRollout: status|promote|abort|retry NAME")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Here, not at the top: `amalia-operator rollout` needs neither kopf nor the handlers.
    import kopf

    import amalia_operator.handlers  # noqa: F401  (registers the handlers with kopf)
    from amalia_operator import kube

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rollout"]:
        from amalia_operator import cli

        return int(cli.main(argv[1:]))
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

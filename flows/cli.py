"""``bevfusion-ptq``: the command line over the flows and the library.

``run`` options are generated from :class:`~bevfusion_ptq.params.PTQParams`, so the CLI, the
Prefect UI form and deployment defaults cannot drift apart. Failures caused by the inputs
print one line and exit with the error's own code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from bevfusion_ptq.errors import ConfigError, PTQError
from bevfusion_ptq.params import PTQParams
from bevfusion_ptq.workdir import state_dir

log = logging.getLogger("bevfusion_ptq.cli")


def _add_param_options(parser: argparse.ArgumentParser) -> None:
    """One option per PTQParams field; unset options keep the model's defaults."""
    for name, field in PTQParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"dest": name, "default": None, "help": field.description}
        annotation = field.annotation
        optional = [a for a in typing.get_args(annotation) if a is not type(None)]
        if type(None) in typing.get_args(annotation) and len(optional) == 1:
            annotation = optional[0]  # "X | None": the option takes an X
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = "PATTERN"
        elif annotation in (int, float):
            kwargs["type"] = annotation
        parser.add_argument(flag, **kwargs)


def params_from_args(ns: argparse.Namespace) -> PTQParams:
    given = {k: getattr(ns, k) for k in PTQParams.model_fields if getattr(ns, k, None) is not None}
    try:
        return PTQParams(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid parameters: {problems}") from None


def use_local_prefect() -> None:
    """Point Prefect at a project-local home unless the user configured an API.

    With no ``PREFECT_API_URL``, runs use Prefect's ephemeral local API with its database
    under our state directory, so the default job never touches the user's Prefect profile.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    home = state_dir() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_PROFILES_PATH", str(home / "profiles.toml"))


def cmd_run(ns: argparse.Namespace) -> int:
    params = params_from_args(ns)
    use_local_prefect()
    # The library's own log lines (calibration progress with rate and ETA, resumes) go to the
    # console and to the Prefect run's logs like the tasks' lines.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "bevfusion_ptq")
    if ns.refresh_cache:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from flows.ptq import ptq  # imports Prefect, after its environment is set

    result = ptq(params)
    verb = "already published at" if result["reused"] else "written to"
    print(f"artifacts {verb} {Path(result['path']).resolve()} (version {result['version']})")
    return 0


def cmd_sensitivity(ns: argparse.Namespace) -> int:
    import json

    params = params_from_args(ns)
    use_local_prefect()
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "bevfusion_ptq")
    from flows.sensitivity import sensitivity_analysis

    out = sensitivity_analysis(params)
    result = out["result"]
    if ns.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['metric']} on {result['num_batches']} held-out batch(es); everything INT8: {result['all_drop']:.4g}")
    print(f"{'rank':>4}  {'only':>10}  {'all but':>10}  {'recovery':>10}  group")
    for g in result["groups"][: ns.top]:
        print(f"{g['rank']:>4}  {g['only']:>10.4g}  {g['all_but']:>10.4g}  {g['recovery']:>10.4g}  {g['name']}")
    proposal = result["proposal"]
    if proposal:
        verdict = "meets" if proposal["met"] else "does NOT meet"
        print(f"proposed exclusions for a drop <= {proposal['target']:g} ({verdict} it, {proposal['drop']:.4g}): "
              + (", ".join(proposal["groups"]) or "none needed"))
        print("modules: " + " ".join(proposal["modules"]))
    print(f"{result['evaluations']} measurements in {result['seconds']:.1f} s; {out['path']}, chart {out['chart']}")
    return 0


def cmd_make_checkpoint(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.model.checkpoint import make_checkpoint
    from bevfusion_ptq.model.config import load_config

    path = Path(ns.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_checkpoint(path, load_config(ns.config), seed=ns.seed)
    print(f"wrote random-weight {ns.config} checkpoint (reference layout) to {path}")
    return 0


def cmd_inspect_checkpoint(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.model.checkpoint import inspect_checkpoint
    from bevfusion_ptq.model.config import load_config

    summary = inspect_checkpoint(Path(ns.path), load_config(ns.config), trust_pickle=ns.trust_pickle)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    import json

    from bevfusion_ptq.model.builder import build_model
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.insert import insert_quantizers
    from bevfusion_ptq.quant.plan import plan_quantizers
    from bevfusion_ptq.quant.rules import bevfusion_rules

    exclude = tuple(ns.exclude) if ns.exclude is not None else None
    model = build_model(load_config(ns.config))
    rows = plan_quantizers(model, insert_quantizers(model, bevfusion_rules(exclude)))
    if ns.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    for r in rows:
        axis = "tensor" if r.axis is None else f"axis {r.axis}"
        state = "on " if r.enabled else "OFF"
        group = f"  [{r.share_group}]" if r.share_group else ""
        print(f"{state} {r.num_bits}b {axis:<10} {r.calibrator:<9} {' = '.join(r.names)}{group}")
    disabled = sum(not r.enabled for r in rows)
    print(f"{len(rows)} quantizers, {len(rows) - disabled} enabled, {disabled} disabled by exclusions")
    return 0


def cmd_make_dataset(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.data import make_dataset

    root = make_dataset(Path(ns.dir), scenes=ns.scenes, frames=ns.frames, seed=ns.seed)
    print(f"wrote a nuScenes-format tree to {root}")
    return 0


def _s3_client(ns: argparse.Namespace):
    """An explicit --endpoint-url client, else None: the library uses the AWS environment."""
    from bevfusion_ptq.s3 import make_client

    return make_client(endpoint_url=ns.endpoint_url) if ns.endpoint_url else None


def cmd_publish(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.s3 import publish_version

    r = publish_version(ns.version_dir, ns.url, sse=ns.sse, kms_key_id=ns.kms_key_id, client=_s3_client(ns))
    state = "already published at" if r.reused else "published to"
    print(f"{r.model} {r.version} {state} {r.url} (latest {'moved' if r.latest_updated else 'unchanged'})")
    return 0


def cmd_fetch(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.s3 import fetch_version

    path = fetch_version(ns.url, ns.version, ns.to, client=_s3_client(ns))
    print(f"fetched and verified {path}")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    import json

    from bevfusion_ptq.s3 import list_versions

    rows = list_versions(ns.url, client=_s3_client(ns))
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if not r["complete"]:
            print(f"  {r['version']:<18} (unfinished: no manifest)")
            continue
        mark = "*" if r["latest"] else " "
        print(f"{mark} {r['version']:<18} {r['created_at']}  {r['size'] / 1e6:8.1f} MB  {r['summary']}")
    if not rows:
        print(f"no versions under {ns.url}")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from flows.serve import PREFECT_FILE, serve_deployments

    serve_deployments(Path(ns.prefect_file) if ns.prefect_file else PREFECT_FILE, limit=ns.limit)
    return 0


def cmd_announce_checkpoint(ns: argparse.Namespace) -> int:
    if ns.checkpoint not in (None, ns.url):
        raise ConfigError("announce-checkpoint takes the checkpoint as URL, not as --checkpoint")
    ns.checkpoint = ns.url
    params = params_from_args(ns)  # refuse a bad event here, not in a failed run later
    from flows.serve import announce_checkpoint

    event = announce_checkpoint(ns.url, params)
    print(f"emitted {event.event} {event.id} for {ns.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bevfusion-ptq",
        description="Post-training INT8 quantization of BEVFusion, as a Prefect flow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the PTQ flow (embedded defaults: tiny model, generated data)")
    _add_param_options(run)
    run.add_argument("--refresh-cache", action="store_true",
                     help="recompute every stage even when a cached result exists (e.g. after cleaning work files)")
    run.set_defaults(func=cmd_run)

    sens = sub.add_parser("sensitivity", help="rank quantizer groups by the metric drop each causes on held-out "
                          "batches and propose exclusions for --sensitivity-target (reuses collected statistics)")
    _add_param_options(sens)
    sens.add_argument("--top", type=int, default=10, help="groups to print (default 10)")
    sens.add_argument("--json", action="store_true", help="print sensitivity.json")
    sens.set_defaults(func=cmd_sensitivity)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the reference layout")
    mk.add_argument("path")
    mk.add_argument("--config", required=True, help="config name or path")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(func=cmd_make_checkpoint)

    insp = sub.add_parser("inspect-checkpoint", help="load a checkpoint strictly on the CPU and summarise it")
    insp.add_argument("path")
    insp.add_argument("--config", required=True, help="config name or path")
    insp.add_argument(
        "--trust-pickle", action="store_true",
        help="UNSAFE: allow full unpickling (arbitrary code) for trusted files that weights_only cannot read",
    )
    insp.set_defaults(func=cmd_inspect_checkpoint)

    pl = sub.add_parser("plan", help="list every quantizer the rules create (no calibration)")
    pl.add_argument("--config", default="bevfusion-r50", help="config name or path")
    pl.add_argument("--exclude", action="append", metavar="PATTERN",
                    help="module path patterns to disable (repeatable; default: the reference's two)")
    pl.add_argument("--json", action="store_true", help="machine-readable list")
    pl.set_defaults(func=cmd_plan)

    ds = sub.add_parser("make-dataset", help="write a small generated tree in the nuScenes layout")
    ds.add_argument("dir")
    ds.add_argument("--scenes", type=int, default=2)
    ds.add_argument("--frames", type=int, default=10)
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(func=cmd_make_dataset)

    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument("--endpoint-url",
                          help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / the AWS config)")
    pub = sub.add_parser("publish", parents=[endpoint],
                         help="publish a saved version directory to s3://bucket/prefix or a local root")
    pub.add_argument("version_dir", metavar="LOCAL_VERSION_DIR")
    pub.add_argument("url", metavar="URL")
    pub.add_argument("--sse", choices=["AES256", "aws:kms"], help="server-side encryption")
    pub.add_argument("--kms-key-id", help="KMS key id or ARN for --sse aws:kms")
    pub.set_defaults(func=cmd_publish)

    fe = sub.add_parser("fetch", parents=[endpoint], help="download a version and verify it against its manifest")
    fe.add_argument("url", metavar="URL", help="s3://bucket/prefix/<model> or a local <root>/<model>")
    fe.add_argument("--version", default="latest", help="latest (default) or a version id")
    fe.add_argument("--to", required=True, metavar="DIR", help="the version lands in DIR/<version>/")
    fe.set_defaults(func=cmd_fetch)

    ls = sub.add_parser("list", parents=[endpoint], help="list versions with creation time and inputs")
    ls.add_argument("url", metavar="URL", help="s3://bucket/prefix/<model> or a local <root>/<model>")
    ls.add_argument("--json", action="store_true", help="machine-readable list")
    ls.set_defaults(func=cmd_list)

    srv = sub.add_parser("serve", help="serve the deployments of deployments/prefect.yaml from this process "
                         "(schedule and event trigger; no work pool or worker); needs PREFECT_API_URL")
    srv.add_argument("--prefect-file", help="deployment file (default: the checkout's deployments/prefect.yaml)")
    srv.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    srv.set_defaults(func=cmd_serve)

    ann = sub.add_parser("announce-checkpoint", help="emit bevfusion.checkpoint.created, which starts "
                         "ptq-on-demand; run options given here travel in the event; needs PREFECT_API_URL")
    ann.add_argument("url", metavar="URL", help="the new checkpoint: a local path or s3:// URL")
    _add_param_options(ann)
    ann.set_defaults(func=cmd_announce_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    level = logging.DEBUG if ns.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Importing pytorch-quantization put absl's handler on the root logger at WARNING, which
    # makes basicConfig a no-op: our own loggers get their level explicitly.
    logging.getLogger("bevfusion_ptq").setLevel(level)
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except PTQError as exc:
        print(f"bevfusion-ptq: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

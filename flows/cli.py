"""``bevfusion-ptq``: the command line over the flows and the library.

``run`` options are generated from :class:`~bevfusion_ptq.params.PTQParams`, so the CLI, the
Prefect UI form and deployment defaults cannot drift apart. Failures caused by the inputs
print one line and exit with the error's own code.

Start-up matters (``--help``, a mistyped option, a re-run with nothing to do): this module
imports only the parameter model and the errors; torch, the model zoo, boto3 and Prefect are
imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bevfusion_ptq import __version__
from bevfusion_ptq.errors import ConfigError, FetchError, PTQError
from bevfusion_ptq.params import PTQParams

log = logging.getLogger("bevfusion_ptq.cli")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, plus each option's default wherever there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text or "default:" in text or not action.option_strings
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f" (default: {shown})"


def _add_verbosity(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v``/``-q`` on the main parser and on every subcommand, so they work anywhere.

    On subcommands the default is SUPPRESS: an absent flag there must not reset one given
    before the subcommand.
    """
    unset = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging", **unset)
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **unset)


def _add_param_options(parser: argparse.ArgumentParser) -> None:
    """One option per PTQParams field; unset options keep the model's defaults."""
    for name, field in PTQParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%") + _default_text(field)
        kwargs: dict = {"dest": name, "default": None, "help": help_text}
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
            kwargs["help"] = (f"{field.description}; adds to the defaults unless --no-default-exclude"
                              f"{_default_text(field)}")
        elif annotation in (int, float):
            kwargs["type"] = _number_or_none(annotation) if type(None) in typing.get_args(field.annotation) else annotation
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--no-default-exclude", action="store_true",
                        help="drop the default exclusions (then only the --exclude patterns apply)")


def exclusions(given: list[str] | None, no_default: bool) -> list[str]:
    """``--exclude`` adds to the reference's exclusions; ``--no-default-exclude`` drops them."""
    from bevfusion_ptq.quant.defaults import DEFAULT_EXCLUDE

    base = [] if no_default else list(DEFAULT_EXCLUDE)
    return base + [p for p in (given or []) if p not in base]


def _number_or_none(kind: type) -> Callable[[str], object]:
    """An option of an optional number also takes ``none`` (PTQParams reads it as no value)."""

    def parse(text: str) -> object:
        return "none" if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def params_from_args(ns: argparse.Namespace) -> PTQParams:
    given = {k: getattr(ns, k) for k in PTQParams.model_fields if getattr(ns, k, None) is not None}
    if given.get("exclude") is not None or getattr(ns, "no_default_exclude", False):
        given["exclude"] = exclusions(given.get("exclude"), getattr(ns, "no_default_exclude", False))
    try:
        return PTQParams(**given)
    except ValidationError as exc:
        problems = "; ".join(
            (f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"invalid parameters: {problems}") from None


def use_local_prefect() -> None:
    """Point Prefect at a project-local home unless the user configured an API.

    With no ``PREFECT_API_URL``, runs use a temporary local API with its database under our
    state directory, so the default job never touches the user's Prefect profile. That
    server dies with the run whatever ends it, and sends no telemetry
    (:mod:`flows.local_server`).
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from bevfusion_ptq.workdir import state_dir

    home = state_dir() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_PROFILES_PATH", str(home / "profiles.toml"))
    from flows.local_server import start_temporary_server

    start_temporary_server()


def cmd_run(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.preflight import check_inputs
    from bevfusion_ptq.rerun import find_published, remember

    params = params_from_args(ns)
    check_inputs(params)  # one line for a bad input, before Prefect, torch or any data is touched
    if not (ns.refresh_cache or ns.full_flow) and (done := find_published(params)) is not None:
        return _report_rerun(params, done, as_json=ns.json)
    use_local_prefect()
    # The library's own log lines (calibration progress with rate and ETA, resumes) go to the
    # console and to the Prefect run's logs like the tasks' lines.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "bevfusion_ptq")
    if ns.refresh_cache:
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"
    from flows.ptq import ptq  # imports Prefect, after its environment is set

    result = ptq(params)
    remember(params, result)
    if ns.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(evaluation_summary(result) + run_summary(result))
    return 0


def evaluation_summary(result: dict) -> str:
    """FP32 and INT8 mAP/NDS and the gate's verdict, a line each (empty without evaluation)."""
    lines = []
    evaluation = result.get("evaluation") or {}
    for mode in ("fp32", "int8") if evaluation else ():
        lines.append(
            f"{mode.upper()}: mAP {100 * evaluation[mode]['mean_ap']:.2f}  NDS {100 * evaluation[mode]['nd_score']:.2f}"
            f"  (nuScenes {evaluation['split']}, {evaluation['samples']} keyframes)"
        )
    if result.get("gate"):
        lines.append(f"gate {result['gate']['status']}: {result['gate']['reason']}")
    return "".join(line + "\n" for line in lines)


def run_summary(result: dict) -> str:
    """The last line of a run: what was published where, and whether anything was computed."""
    where, version = result["url"], result["version"]
    recomputed = result.get("recomputed")
    s3 = str(where).startswith("s3://")
    if recomputed == [] and (result["reused"] or not s3):
        return f"already published at {where}, nothing recomputed (version {version})"
    done = f"published to {where}" if s3 else f"written to {where}"
    if result["reused"] and s3:
        done = f"already published at {where}"
    stages = f"; recomputed: {', '.join(recomputed)}" if recomputed else ""
    return f"{done} (version {version}{stages})"


def _report_rerun(params: PTQParams, done: dict, *, as_json: bool) -> int:
    """A re-run whose version is already published: record it, say so, compute nothing."""
    from flows.rerun import record_rerun

    flow_run_id = record_rerun(params, done)
    result = {**done, "reused": True, "recomputed": [], "flow_run_id": flow_run_id}
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(run_summary(result))
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
    if ns.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.model.builder import build_model
    from bevfusion_ptq.model.config import load_config
    from bevfusion_ptq.quant.insert import insert_quantizers
    from bevfusion_ptq.quant.plan import plan_quantizers
    from bevfusion_ptq.quant.rules import bevfusion_rules

    from bevfusion_ptq.quant.insert import warn_unmatched_exclusions

    exclude = tuple(exclusions(ns.exclude, ns.no_default_exclude))
    model = build_model(load_config(ns.config))
    rows = plan_quantizers(model, insert_quantizers(model, bevfusion_rules(exclude)))
    warn_unmatched_exclusions(model, exclude)
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

    made = make_dataset(Path(ns.dir), scenes=ns.scenes, frames=ns.frames, seed=ns.seed)
    print(f"wrote a nuScenes-format tree to {made.root} in {made.seconds:.1f} s: {made.num_train} training and "
          f"{made.num_val} validation keyframes ({ns.scenes} scenes x {ns.frames}, seed {ns.seed}); "
          f"calibrate on it with: bevfusion-ptq run --data-root {made.root}")
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
    if r.repaired:
        print(f"repaired {len(r.repaired)} damaged file(s) from the local copy: {', '.join(r.repaired)}")
    return 0


def cmd_fetch(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.s3 import fetch_version

    path = fetch_version(ns.url, ns.version, ns.to, client=_s3_client(ns))
    if ns.json:
        print(json.dumps({"path": str(path), "version": path.name, "url": ns.url}, indent=2))
        return 0
    print(f"fetched and verified {path}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.export.from_version import export_version

    try:
        precisions = PTQParams(**({"export": ns.export} if ns.export else {})).export
    except ValidationError:
        raise ConfigError(f"--export {','.join(ns.export)}: choose int8 and/or fp16") from None
    if not precisions:
        raise ConfigError("--export none leaves nothing to export")
    source = ns.version_dir
    if source.startswith("s3://"):
        from bevfusion_ptq.s3 import fetch_version

        model_url, _, version = source.rstrip("/").rpartition("/")
        source = str(fetch_version(model_url, version, Path(ns.to or ".") / "fetched", client=_s3_client(ns)))
    version = Path(source).resolve().name
    out = Path(ns.to) if ns.to else Path(f"deploy-{version}")
    written = export_version(source, out, precisions)
    for info in written:
        print(f"{info.path}  {info.size} bytes  {info.nodes} nodes  {min(info.quantize, info.dequantize)} Q/DQ pairs")
    print(f"wrote {len(written)} files and {out / 'deploy.md'}")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from bevfusion_ptq.s3 import list_versions

    rows = list_versions(ns.url, client=_s3_client(ns))
    if not rows:  # the same answer, and exit code, as fetch gives for the same URL
        raise FetchError(f"nothing published at {ns.url} (the URL must name <prefix>/<model>)")
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if not r["complete"]:
            print(f"  {r['version']:<18} (unfinished: no manifest)")
            continue
        mark = "*" if r["latest"] else " "
        print(f"{mark} {r['version']:<18} {r['created_at']}  {r['size'] / 1e6:8.1f} MB  {r['summary']}")
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
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        cmd = add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        _add_verbosity(cmd, top=False)
        return cmd

    sub.add_parser = add_command  # type: ignore[method-assign]

    run = sub.add_parser("run", help="run the PTQ flow (embedded defaults: tiny model, generated data)")
    _add_param_options(run)
    run.add_argument("--refresh-cache", action="store_true",
                     help="recompute every stage even when a cached result exists (e.g. after cleaning work files)")
    run.add_argument("--full-flow", action="store_true",
                     help="run the Prefect flow even when this version is already published (every stage then "
                          "comes from the cache); without it such a re-run only checks the published copy")
    run.add_argument("--json", action="store_true", help="print the run's result as JSON")
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
    mk.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    mk.set_defaults(func=cmd_make_checkpoint)

    insp = sub.add_parser("inspect-checkpoint", help="load a checkpoint strictly on the CPU and summarise it")
    insp.add_argument("path")
    insp.add_argument("--config", required=True, help="config name or path")
    insp.add_argument(
        "--trust-pickle", action="store_true",
        help="UNSAFE: allow full unpickling (arbitrary code) for trusted files that weights_only cannot read",
    )
    insp.add_argument("--json", action="store_true", help="machine-readable summary")
    insp.set_defaults(func=cmd_inspect_checkpoint)

    pl = sub.add_parser("plan", help="list every quantizer the rules create (no calibration)")
    pl.add_argument("--config", default="bevfusion-r50", help="config name or path")
    pl.add_argument("--exclude", action="append", metavar="PATTERN",
                    help="module path pattern to disable, in addition to the defaults (repeatable)")
    pl.add_argument("--no-default-exclude", action="store_true",
                    help="drop the default exclusions (encoders.lidar.backbone.conv_input.0, "
                         "decoder.neck.deblocks.0.0)")
    pl.add_argument("--json", action="store_true", help="machine-readable list")
    pl.set_defaults(func=cmd_plan)

    ds = sub.add_parser("make-dataset", help="write a small generated tree in the nuScenes layout")
    ds.add_argument("dir")
    ds.add_argument("--scenes", type=int, default=2, help="scenes (the last one is kept for val)")
    ds.add_argument("--frames", type=int, default=10, help="keyframes per scene")
    ds.add_argument("--seed", type=int, default=0, help="seed of the generated content")
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
    fe.add_argument("--version", default="latest", help="latest or a version id")
    fe.add_argument("--to", required=True, metavar="DIR", help="the version lands in DIR/<version>/")
    fe.add_argument("--json", action="store_true", help="print where the version landed as JSON")
    fe.set_defaults(func=cmd_fetch)

    ex = sub.add_parser("export", parents=[endpoint],
                        help="write the deployment ONNX set of a saved version (state_dict.pth + quantizers.json), "
                        "without calibrating again")
    ex.add_argument("version_dir", metavar="VERSION_DIR|s3://bucket/prefix/<model>/<version>")
    ex.add_argument("--to", metavar="DIR", help="where the files go (default: ./deploy-<version>)")
    ex.add_argument("--export", action="append", default=None, metavar="PRECISIONS",
                    help="int8 (default) and/or fp16, comma-separated or repeated")
    ex.set_defaults(func=cmd_export)

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the flow records the crash, children are stopped."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from bevfusion_ptq.logsetup import configure_logging

    configure_logging(verbose=ns.verbose, quiet=ns.quiet)
    func: Callable[[argparse.Namespace], int] = ns.func
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return func(ns)
    except PTQError as exc:
        print(f"bevfusion-ptq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        print(f"bevfusion-ptq: stopped by {signum.name}; saved calibration state is kept and the same "
              "command resumes from it", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())

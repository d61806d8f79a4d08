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
    from flows.ptq import ptq  # imports Prefect, after its environment is set

    result = ptq(params)
    verb = "already published at" if result["reused"] else "written to"
    print(f"artifacts {verb} {Path(result['path']).resolve()} (version {result['version']})")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bevfusion-ptq",
        description="Post-training INT8 quantization of BEVFusion, as a Prefect flow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the PTQ flow (embedded defaults: tiny model, generated data)")
    _add_param_options(run)
    run.set_defaults(func=cmd_run)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = ns.func
    try:
        return func(ns)
    except PTQError as exc:
        print(f"bevfusion-ptq: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""CLI: ``python -m varweight_kernels.experiments {run,report} ...`` (see ``--help``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..training.checkpoint import WriteError
from ..training.config import TrainError
from .runner import RunnerInterrupted


def _split_passthrough(argv: List[str]):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = _split_passthrough(argv)
    ap = argparse.ArgumentParser(prog="python -m varweight_kernels.experiments",
                                 description="Run grids of training runs and report on them.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run methods x grid x seeds (resumable; finished runs are skipped)",
                       epilog="Flags after `--` go to every train_cifar.py run, e.g. `-- --steps 50`; the runner's "
                              "own (--seed --weighting --out --preset --resume --overwrite) are refused there.")
    r.add_argument("--preset", default=None, help="train_cifar.py preset for every run (e.g. digits-cpu)")
    r.add_argument("--methods", nargs="+", required=True, help="weightings: uniform vaw seed-cauchy min-snr ...")
    r.add_argument("--seeds", nargs="+", type=int, required=True)
    r.add_argument("--out", required=True, help="experiment folder (runs go to OUT/runs/LABEL/seedS)")
    r.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="grid axes, e.g. vaw.power=-1,1 (method-scoped) or lr=1e-3,2e-3 (all methods)")
    r.add_argument("--trainer", default=None, help="path of train_cifar.py (default: ./ or the repo root)")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")
    r.add_argument("--report", action="store_true", help="write the report when all runs are done")
    r.add_argument("--baseline", default="uniform", help="baseline for --report")
    a = sub.add_parser("ablation", help="the VAW ablation (issue #17): every variant x seeds on digits, resumable",
                       epilog="Flags after `--` go to every train_cifar.py run.")
    a.add_argument("--out", required=True, help="experiment folder")
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    a.add_argument("--variants", nargs="*", default=None, help="a subset of the variants (default: all)")
    a.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    a.add_argument("--trainer", default=None, help="path of train_cifar.py (default: ./ or the repo root)")
    a.add_argument("--dry-run", action="store_true", help="print the commands only")
    a.add_argument("--report", action="store_true", help="write the report when all runs are done")
    c = sub.add_parser("confirm", help="the pre-registered confirmatory study (issue 22): every variant x the "
                                       "registered fresh seeds on digits, resumable; Holm-corrected report",
                       epilog="Flags after `--` go to every train_cifar.py run (a departure the report names).")
    c.add_argument("--out", required=True, help="experiment folder")
    c.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the registered seeds 100-109")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    c.add_argument("--trainer", default=None, help="path of train_cifar.py (default: ./ or the repo root)")
    c.add_argument("--dry-run", action="store_true", help="print the commands only")
    c.add_argument("--report", action="store_true", help="write EXP/confirm.md and confirm.json when all runs are done")
    c.add_argument("--report-only", action="store_true", help="only write the report from the finished runs")
    p = sub.add_parser("report", help="write EXP/report.md, CSVs and figures")
    p.add_argument("exp", help="experiment folder")
    p.add_argument("--baseline", default="uniform", help="method paired comparisons are made against")
    p.add_argument("--metric", default=None, help="metrics.jsonl key (default: fid, else fd_digits, else loss)")
    p.add_argument("--include-unfinished", action="store_true", help="also use runs without DONE")
    p.add_argument("--out", default=None, help="report path (default EXP/report.md)")
    p.add_argument("--paper-analysis", action="store_true",
                   help="also the paper's variance analysis: raw model, weighted loss, 30 quantile bins of -2 log "
                        "sigma per seed, population variance (ours, the default, stays in the report)")
    args = ap.parse_args(own)
    if args.cmd == "confirm":
        return _guarded(lambda: _confirm(args, passthrough))
    if args.cmd in ("run", "ablation"):
        return _guarded(lambda: _run(args, passthrough))
    if passthrough:
        print("error: `--` pass-through flags belong to `run`", file=sys.stderr)
        return 2
    from .report import build_report

    try:
        out = build_report(args.exp, baseline=args.baseline, metric=args.metric,
                           include_unfinished=args.include_unfinished, out=args.out,
                           paper_analysis=args.paper_analysis)
    except (ValueError, FileNotFoundError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {out['report']}")
    for v in out["verdicts"].values():
        print(v)
    return 0


def _guarded(command) -> int:
    """Run ``command()`` (an exit status); a user-facing failure is one line on stderr."""
    try:
        return command()
    except (ValueError, FileNotFoundError, TrainError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunnerInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum


def _run(args, passthrough: List[str]) -> int:
    if args.cmd == "run":
        from .runner import run_experiment

        res = run_experiment(args.out, args.methods, args.seeds, preset=args.preset, grid=args.grid,
                             passthrough=passthrough, trainer=args.trainer, jobs=args.jobs, dry_run=args.dry_run)
    else:
        from .ablation import run_ablation

        res = run_ablation(args.out, args.seeds, jobs=args.jobs, chosen=args.variants, passthrough=passthrough,
                           trainer=args.trainer, dry_run=args.dry_run)
    print(f"{len(res['done'])} finished, {len(res['skipped'])} already done, {len(res['failed'])} failed")
    if args.report and not args.dry_run and not res["failed"]:
        from .report import build_report

        out = build_report(args.out, baseline=getattr(args, "baseline", "uniform"))
        print(f"report: {out['report']}")
    return 1 if res["failed"] else 0


def _confirm(args, passthrough: List[str]) -> int:
    from .confirm import run_confirm, write_confirm_report

    if not args.report_only:
        res = run_confirm(args.out, args.seeds, jobs=args.jobs, trainer=args.trainer, dry_run=args.dry_run,
                          passthrough=passthrough)
        print(f"{len(res['done'])} finished, {len(res['skipped'])} already done, {len(res['failed'])} failed")
        if res["failed"]:
            return 1
    if (args.report or args.report_only) and not args.dry_run:
        out = write_confirm_report(args.out)
        d = out["decision"]
        print(f"report: {out['report']}")
        print(f"decision (rule {d['rule']}): default {d['default']}; better than uniform: {d['helps'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

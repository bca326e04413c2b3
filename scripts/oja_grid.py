"""Oja rediscovery across input dimension, input scale, unroll length and eigen-spectrum.

At every grid point this runs what a user would, with the presets' default settings and
only the task changed::

    metaplastic train --rule taylor --task pca --set task.dim=D --set task.input_scale=S \\
        --set task.steps=T --set task.eig_decay=G --seed SEED
    metaplastic export RUN --format json

A point *succeeds* when the run ends with status ``ok`` and the exported equation keeps
exactly the two Oja monomials ``x*y`` and ``W*y**2`` (every other monomial pruned by
magnitude or by effect) with ``-theta(W y^2) / theta(x y)`` within 10% of 1.

Writes ``results.json`` (one record per point, with the exported equation, the ratio, the
held-out alignment of the learned and exported rules, and the train time) and ``results.md``
(the table) under ``--out`` (default ``results/oja_grid``). Points already in
``results.json`` are kept and not re-run, so an interrupted grid resumes; ``--fresh``
starts over. Only the small files of each run (summary, rule, export) are kept.

    python scripts/oja_grid.py                # 81 points, about 1.5 h on 1 core
    python scripts/oja_grid.py --report       # only rewrite results.md from results.json
    python scripts/oja_grid.py --reexport     # export the finished runs again (no training)
    python scripts/oja_grid.py --corners      # 16 corners + centre, for a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DIMS = (8, 24, 64)
SCALES = (0.5, 1.0, 2.0)
STEPS = (100, 300, 1000)
DECAYS = (0.7, 0.85, 0.95)
OJA = {"x*y", "W*y**2"}
KEEP = ("summary.json", "rule.json", "export.json", "config.toml")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metaplastic", *args], capture_output=True, text=True
    )


def point_name(p: dict) -> str:
    return f"d{p['dim']}_s{p['input_scale']:g}_T{p['steps']}_g{p['eig_decay']:g}_seed{p['seed']}"


def run_point(p: dict, out: Path, extra: list[str]) -> dict:
    run = out / "runs" / point_name(p)
    if run.exists():
        shutil.rmtree(run)
    sets = [
        f"task.dim={p['dim']}",
        f"task.input_scale={p['input_scale']}",
        f"task.steps={p['steps']}",
        f"task.eig_decay={p['eig_decay']}",
        *extra,
    ]
    args = ["train", "--rule", "taylor", "--task", "pca", "--seed", str(p["seed"])]
    args += ["--out", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    tr = cli(*args)
    rec = dict(p, train_s=round(time.perf_counter() - t0, 1), exit=tr.returncode)
    summary = (
        json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    )
    rec["status"] = summary.get("status", tr.stderr.strip().splitlines()[-1:] or "no summary")
    val = summary.get("validation", {})
    rec["val_start"] = val.get("start", {}).get("score")
    rec["val_learned"] = val.get("learned", {}).get("score")
    rec["skipped_fraction"] = val.get("skipped_fraction")
    if tr.returncode == 0:
        export_point(rec, run, extra)
    else:
        rec.update(success=False, equation=None, kept={}, ratio=None)
    for f in run.iterdir() if run.exists() else []:  # keep the small files only
        if f.name not in KEEP:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return rec


def export_settings(extra: list[str]) -> list[str]:
    """The pca preset's export options (with ``--set`` overrides), passed explicitly so that
    ``--reexport`` applies today's settings to runs trained before they existed."""
    from metaplastic.run import apply_overrides, build_config

    t = apply_overrides(build_config("taylor", "pca"), extra).train
    return ["--prune-effect", str(t.prune_effect), "--prune-refit", str(t.prune_refit)]


def export_point(rec: dict, run: Path, extra: list[str] | None = None) -> dict:
    """``metaplastic export`` of a finished run; fills the record's export fields."""
    rec.update(success=False, equation=None, kept={}, ratio=None)
    ex = cli("export", str(run), "--format", "json", *(export_settings(extra or [])))
    rec["export_exit"] = ex.returncode
    if ex.returncode == 0:
        exp = json.loads((run / "export.json").read_text())
        kept = exp["coefficients"]  # after pruning (and refitting) by effect
        rt = exp["round_trip"]
        rec.update(
            equation=exp["equations"][0],
            kept=kept,
            align_learned=rt["learned"]["accuracy"],
            align_exported=rt["exported equation"]["accuracy"],
        )
        if set(kept) == OJA:
            rec["ratio"] = -kept["W*y**2"] / kept["x*y"]
            rec["success"] = abs(rec["ratio"] - 1.0) <= 0.1
    return rec


def grid(axes: list[tuple], corners: bool, seeds: list[int]) -> list[dict]:
    if corners:
        pts = list(itertools.product(*[(a[0], a[-1]) if len(a) > 1 else a for a in axes]))
        centre = tuple(a[len(a) // 2] for a in axes)
        pts += [centre] if centre not in pts else []
    else:
        pts = list(itertools.product(*axes))
    keys = ("dim", "input_scale", "steps", "eig_decay")
    return [dict(zip(keys, p), seed=s) for p in pts for s in seeds]


def finite_rate_ratio(r: dict) -> float | None:
    """The decay-to-Hebb ratio that keeps ``E||w||^2`` constant at ``w = v1`` for Oja's
    rule with the exported rate ``eta = theta(x y)``, one Gaussian sample per update:
    ``1 + eta (tr C - lambda_1) / 2``. (From ``E||w + dw||^2 - ||w||^2 = 0`` with
    ``dw = eta (x y - r y^2 w)``, ``E y^2 = lambda_1``, ``E y^2 ||x||^2 = lambda_1 tr C +
    2 lambda_1^2``, ``E y^4 = 3 lambda_1^2``, to first order in ``r - 1``.) Oja's ratio 1 is
    its limit ``eta -> 0``; at a large rate the best finite-step rule decays more."""
    eta = (r.get("kept") or {}).get("x*y")
    if eta is None:
        return None
    lam = [r["input_scale"] ** 2 * r["eig_decay"] ** k for k in range(r["dim"])]
    return 1.0 + eta * (sum(lam) - lam[0]) / 2.0


def table(records: list[dict]) -> list[str]:
    lines = [
        "| dim | scale | steps | decay | seed | status | exported equation | ratio | "
        "1 + η(tr C − λ₁)/2 | alignment exported | success | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        fr = finite_rate_ratio(r)
        finite = "—" if fr is None else f"{fr:.3f}"
        eq = f"`dW = {r['equation']}`" if r["equation"] else "—"
        al = f"{r['align_exported']:.3f}" if r.get("align_exported") is not None else "—"
        status = r["status"] if isinstance(r["status"], str) else " ".join(r["status"])
        lines.append(
            f"| {r['dim']} | {r['input_scale']:g} | {r['steps']} | {r['eig_decay']:g} | "
            f"{r['seed']} | {status[:60]} | {eq} | {ratio} | {finite} | {al} | "
            f"{'yes' if r['success'] else '**no**'} | {r['train_s']:.0f} |"
        )
    return lines


def pivot(records: list[dict]) -> list[str]:
    """Rows dim x steps, columns eig_decay; a cell lists, over the input scales (and seeds),
    how many points succeeded and the exported ratios."""
    decays = sorted({r["eig_decay"] for r in records})
    rows = sorted({(r["dim"], r["steps"]) for r in records})
    lines = [
        "| dim | steps | " + " | ".join(f"decay {g:g}" for g in decays) + " |",
        "|---|---|" + "---|" * len(decays),
    ]
    for d, t in rows:
        cells = []
        for g in decays:
            pts = [r for r in records if (r["dim"], r["steps"], r["eig_decay"]) == (d, t, g)]
            ok = sum(r["success"] for r in pts)
            ratios = sorted({"—" if r["ratio"] is None else f"{r['ratio']:.3f}" for r in pts})
            cells.append(f"{ok}/{len(pts)} ({', '.join(ratios)})" if pts else "")
        lines.append(f"| {d} | {t} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/oja_grid"))
    ap.add_argument("--corners", action="store_true", help="16 corners + the centre only")
    ap.add_argument("--seeds", default="0", help="comma-separated meta-training seeds")
    for name, default in (("dims", DIMS), ("scales", SCALES), ("steps", STEPS)):
        ap.add_argument(f"--{name}", default=",".join(map(str, default)), help="axis values")
    ap.add_argument("--decays", default=",".join(map(str, DECAYS)), help="axis values")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results in --out")
    ap.add_argument(
        "--report", action="store_true", help="only rewrite results.md from results.json"
    )
    ap.add_argument(
        "--reexport",
        action="store_true",
        help="do not train: export the finished runs in --out again with the preset's "
        "current export settings (training is deterministic, so this equals a fresh grid "
        "when only the export settings changed)",
    )
    ap.add_argument(
        "--set", action="append", default=[], help="extra override for every run (ablations)"
    )
    args = ap.parse_args()
    res_file = args.out / "results.json"
    done = {}
    if res_file.exists() and not args.fresh:
        stored = json.loads(res_file.read_text())
        done = {point_name(r): r for r in stored["points"]}
        if args.report:
            args.set = stored.get("overrides", [])
        elif done and stored.get("overrides", []) != args.set:
            ap.error(
                f"{res_file} holds points run with --set {stored.get('overrides')}, not "
                f"{args.set}: use the same overrides, another --out, or --fresh"
            )
    try:
        axes = [
            tuple(int(v) for v in args.dims.split(",")),
            tuple(float(v) for v in args.scales.split(",")),
            tuple(int(v) for v in args.steps.split(",")),
            tuple(float(v) for v in args.decays.split(",")),
        ]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        ap.error(
            f"--dims, --scales, --steps, --decays and --seeds take comma-separated numbers ({err})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    points = grid(axes, args.corners, seeds)
    records = []
    if args.report or args.reexport:
        points = [p for p in points if point_name(p) in done]
    for i, p in enumerate(points):
        name = point_name(p)
        if args.reexport and done[name]["exit"] == 0:
            rec = export_point(dict(done[name]), args.out / "runs" / name, args.set)
        else:
            rec = done.get(name) or run_point(p, args.out, args.set)
        records.append(rec)
        ok = sum(r["success"] for r in records)
        print(
            f"[{i + 1}/{len(points)}] {name}: success={rec['success']} ratio={rec['ratio']} "
            f"status={rec['status']} ({ok}/{len(records)} so far)",
            flush=True,
        )
        seen = {point_name(r) for r in records}
        kept = records + [r for n, r in done.items() if n not in seen]  # nothing done is lost
        res_file.write_text(json.dumps({"overrides": args.set, "points": kept}, indent=2) + "\n")
    n_ok = sum(r["success"] for r in records)
    head = [
        f"Oja rediscovery grid: {n_ok} of {len(records)} points succeed "
        f"({100 * n_ok / len(records):.0f}%).",
        "",
        "Success: status ok, exported equation = exactly `x*y` and `W*y**2`, ratio "
        "−θ(W y²)/θ(x y) within 10% of 1. Alignment = mean |cos(w, v1)| of the exported "
        "equation on 500 held-out episodes.",
        "",
    ]
    oja = [r for r in records if r["ratio"] is not None]
    near = [r for r in oja if abs(r["ratio"] / finite_rate_ratio(r) - 1.0) <= 0.1]
    head += [
        f"Exported equation exactly Oja's two terms: {len(oja)} of {len(records)}; of these, "
        f"ratio within 10% of 1: {sum(r['success'] for r in oja)}; within 10% of the "
        f"finite-rate ratio 1 + η(tr C − λ₁)/2 (see `finite_rate_ratio`): {len(near)}.",
        "",
    ]
    if args.set:
        head.insert(1, f"Overrides: {' '.join(args.set)}")
    body = head + ["Successes over the input scales (exported ratios):", ""] + pivot(records)
    body += ["", "Every point:", ""] + table(records)
    (args.out / "results.md").write_text("\n".join(body) + "\n")
    print("\n".join(head))


if __name__ == "__main__":
    main()

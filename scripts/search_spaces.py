"""Rule search spaces: Oja rediscovery on the pca task, and MLP-rule distillation on digits.

1. ``metaplastic train --rule taylor --task pca`` for each seed, then ``export`` (which prunes
   by magnitude and by effect, as the pca preset configures) — does the exported equation
   read ``theta (x y - W y^2)``, with the ratio of the two coefficients within 10% of 1?
2. ``metaplastic train --rule mlp --task digits``, then ``distill`` (sequentially
   thresholded least squares over the 81 monomials): fit R^2 on held-out synapse samples and
   held-out accuracy of the polynomial next to the MLP rule's.

Writes ``results.md`` and ``results.json`` under ``--out`` (default
``results/search_spaces``). Run from the repository root::

    python scripts/search_spaces.py            # 3 pca seeds + 1 MLP run, ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sh(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "metaplastic", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"failed: metaplastic {' '.join(args)}\n{out.stderr}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/search_spaces"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mlp-episodes", type=int, default=2400)
    ap.add_argument(
        "--skip-mlp", action="store_true", help="re-run only the pca seeds; keep the MLP part"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"pca": [], "mlp": None}
    lines = ["## Oja rediscovery: `--rule taylor --task pca` (the preset's settings)", ""]
    lines += [
        "| seed | exported equation | ratio -θ(W y²)/θ(x y) | alignment learned | "
        "alignment exported | train s |",
        "|---|---|---|---|---|---|",
    ]
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = args.out / f"pca_seed{seed}"
        t0 = time.perf_counter()
        sh(
            "train",
            "--rule",
            "taylor",
            "--task",
            "pca",
            "--seed",
            str(seed),
            "--out",
            str(run),
            "--quiet",
            "--force",  # a re-run replaces the earlier run
        )
        train_s = time.perf_counter() - t0
        sh("export", str(run), "--format", "json")
        exp = json.loads((run / "export.json").read_text())
        eq = exp["equations"][0]
        rt = exp["round_trip"]
        coefs = exp["coefficients"]  # after pruning (and refitting) by effect
        ratio = None
        if set(coefs) == {"x*y", "W*y**2"}:
            ratio = -coefs["W*y**2"] / coefs["x*y"]
        row = {
            "seed": seed,
            "equation": eq,
            "kept": coefs,
            "ratio": ratio,
            "learned": rt["learned"],
            "exported": rt["exported equation"],
            "train_s": round(train_s, 1),
        }
        results["pca"].append(row)
        r = "n/a (not Oja)" if ratio is None else f"{ratio:.3f}"
        lines.append(
            f"| {seed} | `dW = {eq}` | {r} | {rt['learned']['accuracy']:.3f} | "
            f"{rt['exported equation']['accuracy']:.3f} | {train_s:.0f} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "Alignment = mean |cos(w, v1)| over 500 held-out episodes (new random covariances).",
        "",
    ]
    if args.skip_mlp and (args.out / "results.json").exists():  # keep the earlier MLP part
        results["mlp"] = json.loads((args.out / "results.json").read_text()).get("mlp")
        old = (args.out / "results.md").read_text().split("\n")
        start = next((i for i, x in enumerate(old) if x.startswith("## MLP rule")), None)
        lines += old[start:] if start is not None else []
    if not args.skip_mlp:
        run = args.out / "mlp_digits"
        t0 = time.perf_counter()
        sh(
            "train",
            "--rule",
            "mlp",
            "--task",
            "digits",
            "--episodes",
            str(args.mlp_episodes),
            "--out",
            str(run),
            "--quiet",
            "--force",  # a re-run replaces the earlier run
        )
        train_s = time.perf_counter() - t0
        sh("distill", str(run))
        d = json.loads((run / "distilled.json").read_text())
        info = d["distillation"]
        mt = info["meta_test"]
        results["mlp"] = {"equation": d["equation"], **info, "train_s": round(train_s, 1)}
        lines += [
            f"## MLP rule on digits ({args.mlp_episodes} episodes, seed 0) distilled",
            "",
            f"Distilled polynomial ({info['n_terms']} of 81 monomials, {info['method']}, "
            f"alpha {info['alpha']}): `{d['equation']}`",
            "",
            f"Fit R² on {info['samples'] - info['fit_samples']} held-out synapse samples: "
            f"{info['r2']:.4f}",
            "",
            "| rule | meta-test accuracy | 95% CI | episodes |",
            "|---|---|---|---|",
        ]
        for k, v in mt.items():
            lo, hi = v["ci95"]
            lines.append(f"| {k} | {v['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {v['episodes']} |")
        lines += ["", f"Difference (polynomial − MLP): {info['difference']:+.4f}", ""]
        # ablations of the distilled polynomial, on the same held-out episodes
        # (which terms matter: the pseudo-gradient term alone, then the polynomial with each
        # other term left out; none when the polynomial has a single term)
        c = d["coefficients"]

        def poly(names):
            return " + ".join(f"{c[n]!r}*{n}" if n != "1" else repr(c[n]) for n in names)

        ablations = {}
        if len(c) > 1:
            if "e*x" in c:
                ablations["e*x term only"] = poly(["e*x"])
            for n in c:
                ablations[f"without {n}"] = poly([m for m in c if m != n])
        if ablations:
            lines += ["| ablation of the polynomial | equation | meta-test accuracy | 95% CI |"]
            lines += ["|---|---|---|---|"]
        results["mlp"]["ablations"] = {}
        for name, eq in ablations.items():
            out = sh("evaluate", str(run), "--equation", eq).strip().splitlines()[-1]
            cells = [x.strip() for x in out.strip("|").split("|")]
            results["mlp"]["ablations"][name] = {"equation": eq, "row": cells}
            lines.append(f"| {name} | `{eq}` | {cells[1]} | {cells[2]} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Smoother benchmark: acceleration error and MPJPE before/after every method, SmoothNet-style.

The three CMU clips (cmu_131_01..03, 120 fps mocap → 30 fps) with tracker-shaped noise from
smoother_svc/tracker_noise.json (fixed seeds 101..103, none used in training or validation),
smoothed through the service's own code path (gap planning, visibility weighting, world + image
landmarks). Figures are over world landmarks (hip-centred, all 33), in mm:
accel error = mean |Δ²ŷ − Δ²y| (mm/frame²), MPJPE = mean |ŷ − y|. Time = wall time to smooth
world and image landmarks, per 1 000 frames (best of 3, torch on 1 thread).

The learned smoother trains on cmu_131_01/02: only cmu_131_03 (held out) is a fair test for it;
the table gives the held-out clip separately and marks the learned rows on training clips.

    python -m bench.bench_smoother             # table + JSON in bench/results/smoother-<UTC>.json
    python -m bench.bench_smoother --tune      # grid search on the tuning clips 01/02 (presets)

Goal (issue 5): accel error cut by ≥ 70 % with MPJPE no worse than the noisy input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from smoother_svc import metrics, presets
from smoother_svc.checkpoints import CheckpointStore
from smoother_svc.filters import Butterworth, FilterSpec, KalmanRts, OneEuro, SavitzkyGolay
from smoother_svc.noise import NoiseModel, load_noise_model
from smoother_svc.reference_data import ALL_CLIPS, HELD_OUT_CLIPS, TRAIN_CLIPS, ReferenceClip, load_clip, noisy_track
from smoother_svc.smoothing import SmoothingPlan, smooth_track
from smoother_svc.smoothnet import LearnedSmoother, SmoothNet
from smoother_svc.training import TrainingConfig, TrainingData, train

REPO = Path(__file__).resolve().parent.parent
MOCAP = REPO / "smoother_svc" / "training_motion"  # shipped, xz-compressed
RESULTS = REPO / "bench" / "results"
SEEDS = {name: 101 + i for i, name in enumerate(ALL_CLIPS)}
GOAL_ACCEL_CUT = 0.70


@dataclass
class Row:
    method: str
    strength: str
    clip: str
    accel_in: float
    accel_out: float
    mpjpe_in: float
    mpjpe_out: float
    seen_in_training: bool = False


@dataclass
class Case:
    clip: ReferenceClip
    track: object  # PoseTrack


def load_cases(noise: NoiseModel) -> list[Case]:
    cases = []
    for name in ALL_CLIPS:
        clip = load_clip(MOCAP, name)
        cases.append(Case(clip, noisy_track(clip, noise, np.random.default_rng(SEEDS[name]))))
    return cases


def evaluate(plan: SmoothingPlan, case: Case) -> tuple[float, float]:
    out = smooth_track(case.track, plan).track.world
    return metrics.accel_error_mm(out, case.clip.world), metrics.mpjpe_mm(out, case.clip.world)


def time_per_1000(plan: SmoothingPlan, cases: list[Case], repeats: int = 3) -> float:
    frames = sum(c.clip.frames for c in cases)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for case in cases:
            smooth_track(case.track, plan)
        best = min(best, time.perf_counter() - started)
    return best / frames * 1000.0


def learned_model(checkpoint_dir: Path, train_if_missing: bool) -> tuple[LearnedSmoother | None, str]:
    store = CheckpointStore(checkpoint_dir)
    newest = store.newest()
    if newest is not None:
        return store.load(newest), f"checkpoint {newest.version} from {checkpoint_dir} (epochs {newest.epochs}, seed {newest.seed})"
    if not train_if_missing:
        return None, "no checkpoint"
    print("no checkpoint: training one with the default configuration (seed 1) ...", file=sys.stderr)
    config = TrainingConfig()
    started = time.perf_counter()
    trained = train(config, TrainingData.load(MOCAP, load_noise_model()))
    model = SmoothNet(window=trained.window)
    model.load_state_dict(trained.state_dict)
    model.eval()
    took = time.perf_counter() - started
    return LearnedSmoother(model=model, version="bench"), f"trained in-process, default config, {took:.0f} s"


def plans(learned: LearnedSmoother | None) -> list[tuple[str, str, SmoothingPlan]]:
    out: list[tuple[str, str, SmoothingPlan]] = [
        ("none", "-", presets.resolve(presets.STANDARD, presets.NONE, None, lambda: None)),
        ("one_euro_mediapipe", "-", presets.resolve(presets.STANDARD, presets.ONE_EURO_MEDIAPIPE, None, lambda: None)),
    ]
    for method in (presets.ONE_EURO, presets.SAVGOL, presets.BUTTERWORTH, presets.KALMAN_RTS):
        for strength in presets.STRENGTHS:
            out.append((method, strength, presets.resolve(strength, method, None, lambda: None)))
    if learned is not None:
        out.append(("learned", "-", presets.resolve(presets.STANDARD, presets.LEARNED, None, lambda: learned)))
    return out


def run_table(cases: list[Case], learned: LearnedSmoother | None) -> tuple[list[Row], dict[str, float]]:
    rows, timings = [], {}
    for method, strength, plan in plans(learned):
        for case in cases:
            accel_in = metrics.accel_error_mm(case.track.world, case.clip.world)
            mpjpe_in = metrics.mpjpe_mm(case.track.world, case.clip.world)
            accel_out, mpjpe_out = evaluate(plan, case)
            rows.append(Row(method, strength, case.clip.name, accel_in, accel_out, mpjpe_in, mpjpe_out,
                            seen_in_training=method == "learned" and case.clip.name in TRAIN_CLIPS))
        timings[f"{method}/{strength}"] = time_per_1000(plan, cases)
    return rows, timings


def summarise(rows: list[Row], clips: tuple[str, ...]) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, group in itertools.groupby(rows, key=lambda r: (r.method, r.strength)):
        chosen = [r for r in group if r.clip in clips]
        out[key] = {f: float(np.mean([getattr(r, f) for r in chosen]))
                    for f in ("accel_in", "accel_out", "mpjpe_in", "mpjpe_out")}
    return out


def print_table(title: str, summary: dict, timings: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'method':<20}{'strength':<10}{'accel in → out (mm/f²)':>26}{'ratio':>8}{'cut':>7}"
          f"{'MPJPE in → out (mm)':>24}{'ratio':>8}{'ms/1000 f':>11}  goal")
    for (method, strength), s in summary.items():
        ratio_a = s["accel_out"] / s["accel_in"]
        ratio_m = s["mpjpe_out"] / s["mpjpe_in"]
        goal = "yes" if (1 - ratio_a) >= GOAL_ACCEL_CUT and ratio_m <= 1.0 else "no"
        print(f"{method:<20}{strength:<10}{s['accel_in']:>12.2f} → {s['accel_out']:>9.2f}{ratio_a:>8.3f}"
              f"{(1 - ratio_a) * 100:>6.1f}%{s['mpjpe_in']:>11.2f} → {s['mpjpe_out']:>8.2f}{ratio_m:>8.3f}"
              f"{timings[f'{method}/{strength}'] * 1000:>11.1f}  {goal}")


# --- tuning ---------------------------------------------------------------------------------


def grids() -> dict[str, list[FilterSpec]]:
    return {
        presets.ONE_EURO: [OneEuro(mc, b) for mc in (0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0) for b in (0.0, 1.0, 5.0, 20.0)],
        presets.SAVGOL: [SavitzkyGolay(w, o) for w in (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5) for o in (2, 3)],
        presets.BUTTERWORTH: [Butterworth(f, o) for f in (0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
                              for o in (1, 2, 4)],
        presets.KALMAN_RTS: [KalmanRts("cv", q, r) for q in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
                             for r in (0.005, 0.01, 0.02, 0.03, 0.05, 0.08)]
                            + [KalmanRts("ca", q, r) for q in (3.0, 10.0, 30.0, 100.0, 300.0) for r in (0.01, 0.02, 0.05)],
    }


# Each strength is tuned for a noise level: light for takes half as noisy as the measured tracker,
# strong for takes twice as noisy. One objective for all (the project's goal): the lowest MPJPE
# among parameters that cut the acceleration error by ≥ 70 % (if none does: the largest cut whose MPJPE is
# no worse than the input's).
STRENGTH_NOISE = {presets.LIGHT: 0.5, presets.STANDARD: 1.0, presets.STRONG: 2.0}

def tune(noise: NoiseModel) -> dict:
    out: dict = {"rule": "per strength: noise x{light 0.5, standard 1, strong 2}; lowest MPJPE with accel cut >= 70 % "
                         f"(else the largest cut with MPJPE <= input); the method with the lowest MPJPE wins",
                 "strengths": {}}
    for strength, scale in STRENGTH_NOISE.items():
        cases = []
        for name in ALL_CLIPS:
            clip = load_clip(MOCAP, name)
            cases.append(Case(clip, noisy_track(clip, noise, np.random.default_rng(SEEDS[name]), scale)))
        tuning = [c for c in cases if c.clip.name in TRAIN_CLIPS]
        held = [c for c in cases if c.clip.name in HELD_OUT_CLIPS]
        accel_in = float(np.mean([metrics.accel_error_mm(c.track.world, c.clip.world) for c in tuning]))
        mpjpe_in = float(np.mean([metrics.mpjpe_mm(c.track.world, c.clip.world) for c in tuning]))
        per_method: dict[str, dict] = {}
        for method, specs in grids().items():
            candidates = []
            for spec in specs:
                plan = SmoothingPlan(label=method, world=spec, image=None, max_gap_s=presets.DEFAULT_MAX_GAP_S)
                figures = [evaluate(plan, c) for c in tuning]
                accel = float(np.mean([f[0] for f in figures]))
                candidates.append({"spec": spec, "accel": accel, "mpjpe": float(np.mean([f[1] for f in figures])),
                                   "cut": 1 - accel / accel_in})
            best = _best(candidates, mpjpe_in)
            held_accel, held_mpjpe = evaluate(SmoothingPlan(method, best["spec"], None, presets.DEFAULT_MAX_GAP_S), held[0])
            per_method[method] = {**best, "spec": repr(best["spec"]), "held_out_accel": held_accel,
                                  "held_out_mpjpe": held_mpjpe}
        winner = _winner(per_method)
        out["strengths"][strength] = {"noise_scale": scale, "input_accel": accel_in, "input_mpjpe": mpjpe_in,
                                      "per_method": per_method, "winner": winner}
        print(f"\n{strength} (noise x{scale}): tuning clips input accel {accel_in:.2f} mm/f², MPJPE {mpjpe_in:.2f} mm")
        for method, best in per_method.items():
            mark = "  <- preset" if method == winner else ""
            print(f"  {method:<12} {best['spec']:<72} accel {best['accel']:6.2f} (cut {best['cut'] * 100:4.1f}%)"
                  f"  MPJPE {best['mpjpe']:6.2f} | held-out accel {best['held_out_accel']:6.2f}"
                  f" MPJPE {best['held_out_mpjpe']:6.2f}{mark}")
    return out


def _best(candidates: list[dict], mpjpe_in: float) -> dict:
    """Lowest MPJPE among ≥ 70 % cuts; else the largest cut with MPJPE no worse than the input;
    else the lowest MPJPE."""
    ok = [c for c in candidates if c["cut"] >= GOAL_ACCEL_CUT]
    if ok:
        return min(ok, key=lambda c: c["mpjpe"])
    no_worse = [c for c in candidates if c["mpjpe"] <= mpjpe_in]
    return max(no_worse, key=lambda c: c["cut"]) if no_worse else min(candidates, key=lambda c: c["mpjpe"])


def _winner(per_method: dict[str, dict]) -> str:
    meeting = {m: b for m, b in per_method.items() if b["cut"] >= GOAL_ACCEL_CUT} or per_method
    return min(meeting, key=lambda m: meeting[m]["mpjpe"])


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_smoother", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune", action="store_true", help="grid-search every classical method on clips 01/02")
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "data" / "smoother" / "checkpoints")
    parser.add_argument("--no-train", action="store_true", help="skip the learned method when no checkpoint exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    noise = load_noise_model()
    cases = load_cases(noise)
    report: dict = {
        "benchmark": "smoother",
        "time_utc": datetime.now(timezone.utc).isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "caveat": "2 shared CPU cores; other work ran at the same time, so timings are noisy"},
        "noise_model": {"source": noise.source, "provisional": noise.provisional, "seeds": SEEDS},
        "clips": {c.clip.name: c.clip.frames for c in cases},
        "training_clips": list(TRAIN_CLIPS), "held_out_clips": list(HELD_OUT_CLIPS),
    }
    if noise.provisional:
        print("NOTE: the tracker noise model is PROVISIONAL (not measured on tracker output)", file=sys.stderr)
    if args.tune:
        report["tuning"] = tune(noise)
    learned, learned_source = (None, "skipped") if args.tune else learned_model(args.checkpoint_dir, not args.no_train)
    report["learned_model"] = learned_source
    if not args.tune:
        rows, timings = run_table(cases, learned)
        all_clips = summarise(rows, ALL_CLIPS)
        held_out = summarise(rows, HELD_OUT_CLIPS)
        print_table(f"all clips {ALL_CLIPS} (learned rows include its training clips)", all_clips, timings)
        print_table(f"held-out clip {HELD_OUT_CLIPS} (fair for every method)", held_out, timings)
        print(f"\nlearned: {learned_source}")
        report["rows"] = [asdict(r) for r in rows]
        report["summary_all"] = {f"{m}/{s}": v for (m, s), v in all_clips.items()}
        report["summary_held_out"] = {f"{m}/{s}": v for (m, s), v in held_out.items()}
        report["seconds_per_1000_frames"] = timings
        report["presets"] = {s: presets.PRESET_METHOD[s] for s in presets.STRENGTHS}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"smoother-{stamp}{'-tune' if args.tune else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ground contact and foot locking: planted feet stop sliding, by a measured factor, without
pops, and without pulling clean motion far from its landmarks."""

from __future__ import annotations

import numpy as np

from exporter_svc import feet
from exporter_svc.solve import SolveOptions, TakeInput, solve_take
from tests.exporter.conftest import cmu_global_landmarks, solve_cmu

CLIP = "cmu_131_01"  # subject 131 walking (120 fps, 995 frames)


def _skate(take, mask):
    return feet.foot_skate(feet.contact_point_positions(take.skeleton, take.motion), mask)


def test_foot_locking_stops_sliding_on_noisy_walking():
    # Ground truth contacts: detected on the clean clip. The noisy clip is the clean landmarks plus
    # 1 cm Gaussian noise per coordinate per frame (at 120 fps: a harsh, unsmoothed tracker).
    truth = solve_cmu(CLIP).contacts.mask
    unlocked = solve_cmu(CLIP, noise_m=0.01, foot_locking=False)
    locked = solve_cmu(CLIP, noise_m=0.01, foot_locking=True)
    before, after = _skate(unlocked, truth), _skate(locked, truth)
    factor = before / after
    print(f"foot skate on ground-truth contact frames: {before * 1000:.0f} mm unlocked → "
          f"{after * 1000:.0f} mm locked (÷{factor:.1f})")
    # Measured: 44 830 mm → 879 mm, a factor of 51.
    assert factor > 20.0
    # On the contacts the solver detected itself, what is left is only the gliding from one anchor to
    # the next where a contact drifted more than 3 cm (measured 1 % of the unlocked skate).
    assert locked.skate_m < 0.03 * locked.unlocked_skate_m
    assert (locked.contacts.mask == truth).mean() > 0.95  # detection survives the noise


def test_foot_locking_holds_a_standing_performer_still():
    # A synthetic stand: the clip's first frame held for 4 s at 30 fps, with 1 cm noise.
    pose = cmu_global_landmarks(CLIP)[0]
    landmarks = np.repeat(pose[None], 120, axis=0) + np.random.default_rng(3).normal(0, 0.01, (120, 33, 3))
    root = 0.5 * (landmarks[:, 23] + landmarks[:, 24])
    take_input = TakeInput(world=landmarks - root[:, None], visibility=np.ones((120, 33)), root=root)
    unlocked = solve_take(take_input, SolveOptions(fps=30.0, foot_locking=False))
    locked = solve_take(take_input, SolveOptions(fps=30.0, foot_locking=True))
    assert locked.contacts.foot_contact_fraction() > 0.95
    everything = np.ones((120, 4), bool)
    before, after = _skate(unlocked, everything), _skate(locked, everything)
    print(f"standing: {before * 1000:.0f} mm → {after * 1000:.1f} mm")
    assert after < before / 50


def test_locking_changes_clean_motion_only_a_little_and_smoothly():
    unlocked = solve_cmu(CLIP, foot_locking=False)
    locked = solve_cmu(CLIP, foot_locking=True)
    a, b = unlocked.pose().positions, locked.pose().positions
    moved = np.linalg.norm(a - b, axis=-1)
    # Clean CMU feet do move a little while "in contact" (pivots, heel roll, the synthetic heel
    # point follows the shin), and locking removes exactly that. Measured: joints move 6.7 mm on
    # average, 51 mm at the 99th percentile, 138 mm at most (a knee that bends when the hips are
    # lowered to keep a pinned foot within reach).
    assert moved.mean() < 0.01
    assert np.percentile(moved, 99) < 0.06
    assert moved.max() < 0.15
    # No pops: no joint moves between two frames much further than it ever does unlocked
    # (measured: at most 4 mm beyond 1.5 × the unlocked maximum).
    step_a = np.linalg.norm(np.diff(a, axis=0), axis=-1).max(axis=0)
    step_b = np.linalg.norm(np.diff(b, axis=0), axis=-1).max(axis=0)
    assert np.all(step_b <= step_a * 1.5 + 0.01), (step_a, step_b)


def test_disabled_locking_leaves_the_solve_alone():
    take = solve_cmu(CLIP, slice(0, 300), foot_locking=False)
    assert take.lock_report is None and take.skate_m == take.unlocked_skate_m


def test_contact_detection_finds_the_stance_phases_of_a_walk():
    take = solve_cmu(CLIP)
    mask = take.contacts.mask
    # Walking: at least one foot is down nearly all the time, both feet alternate.
    assert take.contacts.foot_contact_fraction() > 0.9
    left, right = mask[:, :2].any(axis=1), mask[:, 2:].any(axis=1)
    assert 0.3 < left.mean() < 0.9 and 0.3 < right.mean() < 0.9
    assert len(feet._segments(left)) >= 3 and len(feet._segments(right)) >= 3

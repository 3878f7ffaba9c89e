"""The prompt-adherence checker of `dcae experiment t2i` (dcae.experiments.shapes): it reads the rendered truth
back exactly, survives blur and noise, catches each kind of mistake on its own, and its chance level matches
the analytic one."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from dcae.experiments import shapes as S

OPPOSITE = S.OPPOSITE


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(7)
    out = []
    for _ in range(120):
        scene = S.random_scene(rng)
        out.append((scene, S.render(scene, 128, rng)))
    return out


def test_captions_parse_back():
    kinds = {S.Scene(S.Thing(c1, s1), r, S.Thing(c2, s2)).canonical() for c1 in S.COLOURS for c2 in S.COLOURS
             if c1 != c2 for s1 in S.SHAPES for s2 in S.SHAPES for r in S.RELATIONS}  # fmt: skip
    assert len(kinds) == S.SCENE_KINDS
    rng = random.Random(0)
    for _ in range(200):
        scene = S.random_scene(rng)
        assert S.parse(scene.caption()) == scene
        other_wording = S.Scene(scene.second, S.OPPOSITE[scene.relation], scene.first)
        assert other_wording.canonical() == scene.canonical() and scene.canonical().relation in ("above", "left of")
    for bad in ["", "a red circle", "a red circle near a blue square", "a pink circle above a blue square",
                "a red cube above a blue square", "the red circle above a blue square"]:  # fmt: skip
        with pytest.raises(ValueError):
            S.parse(bad)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_checker_reads_the_rendered_truth(size):
    data = S.make_set(60, size, seed=size)
    assert S.adherence([i for i, _ in data], [c for _, c in data]) == {a: 1.0 for a in S.ASPECTS}


def test_checker_survives_blur_and_noise(scenes):
    rng = np.random.default_rng(0)
    for scene, img in scenes[:40]:
        blurred = np.clip(gaussian_filter(img.astype(float), (1.5, 1.5, 0)), 0, 255).astype(np.uint8)
        noisy = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        assert S.check(blurred, scene.caption())["all"]
        assert S.check(noisy, scene.caption())["all"]


def test_each_mistake_is_caught_on_its_own(scenes):
    for scene, img in scenes:
        # the same scene named the other way round is the same picture
        assert S.check(img, S.Scene(scene.second, OPPOSITE[scene.relation], scene.first).caption())["all"]
        # the opposite arrangement: only position is wrong
        flipped = S.check(img, S.Scene(scene.first, OPPOSITE[scene.relation], scene.second).caption())
        assert flipped == {"colour": True, "shape": True, "position": False, "all": False}
        # another shape for the first object: only shape is wrong
        other_shape = next(s for s in S.SHAPES if s != scene.first.shape)
        wrong = S.Scene(S.Thing(scene.first.colour, other_shape), scene.relation, scene.second)
        assert S.check(img, wrong.caption()) == {"colour": True, "shape": False, "position": True, "all": False}
        # a colour that is not there: colour is wrong, and that object cannot be placed
        absent = next(c for c in S.COLOURS if c not in (scene.first.colour, scene.second.colour))
        wrong = S.Scene(S.Thing(absent, scene.first.shape), scene.relation, scene.second)
        assert S.check(img, wrong.caption()) == {"colour": False, "shape": False, "position": False, "all": False}


def test_an_extra_object_or_an_empty_picture_fails(scenes):
    scene, img = scenes[0]
    blank = np.full_like(img, S.BACKGROUND)
    assert S.check(blank, scene.caption()) == {a: False for a in S.ASPECTS}
    third = next(c for c in S.COLOURS if c not in (scene.first.colour, scene.second.colour))
    extra = img.copy()
    extra[:12, :12] = S.COLOURS[third]  # a third colour in a corner
    assert not S.check(extra, scene.caption())["colour"]


def test_fill_ratios_are_the_shapes_areas():
    # analytic: a disc fills pi/4 of its square, an isosceles triangle of base = height half of its box
    for shape, expected in (("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        mask = S._shape_mask(shape, 400, 200.0, 200.0, 150.0)
        assert S.fill_ratio(mask) == pytest.approx(expected, abs=0.01), shape
        assert S.shape_of(mask) == shape


def test_chance_matches_the_analytic_rate():
    # two distinct colours out of 4: a wrong caption names the same pair with probability 1 / C(4, 2)
    data = S.make_set(900, 64, seed=3)
    rate = S.chance([i for i, _ in data], [c for _, c in data])["colour"]
    p = 1 / math.comb(4, 2)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 900)

"""Layouts: validation, the MMPL layout as DESIGN.md section 3 states it, ablations, AR, custom, visibility masks.

Masks are rebuilt here from the stage tables written out by hand, independently of `Layout`'s own loops.
"""

import pytest
import torch

from mmpl_fast.layouts import LAYOUTS, ROLES, Layout, Stage, ar, custom, get_layout, mmpl, validate

R = lambda a, b: tuple(range(a, b))  # noqa: E731

# DESIGN.md section 3, written out: (frames, reads besides itself, role).
MMPL_TABLE = [
    ((0, 1), (), "start"),
    ((2, 3, 10, 11, 12, 19, 20), (0, 1), "plan"),
    (R(4, 10), (0, 1, 2, 3, 10, 11, 12), "populate"),
    (R(13, 19), (*R(0, 13), 19, 20), "populate"),
]


def inference_mask(n, table):
    """(i, j): frame i attends to frame j: its stage's frames (bidirectional) and the stage's reads."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for frames, reads, *_ in table:
        for i in frames:
            for j in (*frames, *reads):
                m[i, j] = True
    return m


def teacher_forcing_mask(n, table):
    """[clean | noisy]: noisy of stage k -> noisy of stage k + clean reads; clean of stage k -> clean of k + reads."""
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    clean = lambda f: f  # noqa: E731
    noisy = lambda f: n + f  # noqa: E731
    for frames, reads, *_ in table:
        for i in frames:
            for j in frames:
                m[noisy(i), noisy(j)] = True
                m[clean(i), clean(j)] = True
            for j in reads:
                m[noisy(i), clean(j)] = True
                m[clean(i), clean(j)] = True
    return m


def table_of(layout):
    return [(s.frames, s.reads, s.role) for s in layout.stages]


# ------------------------------------------------------------------------------------------- MMPL layout
def test_mmpl_is_design_section_3():
    lay = mmpl()
    assert lay.name == "mmpl" and lay.num_frames == 21 and lay.num_stages == 4
    assert table_of(lay) == MMPL_TABLE
    assert lay.handoff == {"terminal": (19, 20), "middle": (10, 11, 12)}
    assert lay.start_frames == 2
    # populate of the first half does not see the terminal keyframes
    assert not set(lay.stages[2].reads) & {19, 20}
    assert lay.stage_of(11) == 1 and lay.stage_of(15) == 3
    assert get_layout("mmpl") == lay
    assert lay.stage_slices() == [s[0] for s in MMPL_TABLE]


def test_mmpl_visibility_masks():
    lay = mmpl()
    assert torch.equal(lay.frame_visibility(), inference_mask(21, MMPL_TABLE))
    assert torch.equal(lay.training_visibility(), teacher_forcing_mask(21, MMPL_TABLE))


def test_mmpl_mask_spot_checks():
    vis = mmpl().frame_visibility()
    assert vis[4, 19].item() is False and vis[13, 19].item() is True  # populate halves
    assert vis[2, 20].item() is True and vis[0, 2].item() is False  # plan is joint; start sees only itself
    tv = mmpl().training_visibility()
    n = 21
    assert tv[n + 4, 2].item() is True  # noisy 4 sees clean 2 (read)
    assert tv[n + 4, n + 2].item() is False  # ... but not noisy 2
    assert tv[n + 4, n + 9].item() is True  # noisy inside its stage
    assert tv[4, n + 4].item() is False  # clean never sees noisy
    assert tv[2, 4].item() is False  # clean of an earlier stage does not see later clean


@pytest.mark.parametrize(
    "name, early, middle, table",
    [
        (
            "mmpl-no-early",
            False,
            True,
            [
                ((0, 1), (), "start"),
                ((10, 11, 12, 19, 20), (0, 1), "plan"),
                (R(2, 10), (0, 1, 10, 11, 12), "populate"),
                (R(13, 19), (*R(0, 13), 19, 20), "populate"),
            ],
        ),
        (
            "mmpl-no-mid",
            True,
            False,
            [
                ((0, 1), (), "start"),
                ((2, 3, 19, 20), (0, 1), "plan"),
                (R(4, 10), (0, 1, 2, 3), "populate"),
                (R(10, 19), (*R(0, 10), 19, 20), "populate"),
            ],
        ),
    ],
)
def test_mmpl_ablations(name, early, middle, table):
    lay = mmpl(early=early, middle=middle)
    validate(lay)
    assert lay.name == name and get_layout(name) == lay
    assert table_of(lay) == table
    assert sorted(f for s in lay.stages for f in s.frames) == list(range(21))
    assert torch.equal(lay.frame_visibility(), inference_mask(21, table))
    assert torch.equal(lay.training_visibility(), teacher_forcing_mask(21, table))
    assert lay.handoff["terminal"] == (19, 20)
    assert ("middle" in lay.handoff) == middle


def test_mmpl_without_both_keyframe_kinds_is_valid():
    lay = mmpl(early=False, middle=False)
    assert lay.name == "mmpl-no-early-no-mid"
    assert lay.stages[1].frames == (19, 20)


def test_mmpl_rejects_other_geometry():
    with pytest.raises(ValueError, match="21 latent frames"):
        mmpl(num_frames=24)
    with pytest.raises(TypeError, match="num_frames"):
        mmpl(num_frames="21")
    with pytest.raises(TypeError, match="early"):
        mmpl(early=1)


# ----------------------------------------------------------------------------------------------- AR layouts
@pytest.mark.parametrize("block", [1, 3])
def test_ar(block):
    lay = ar(21, block)
    assert lay.name == f"ar{block}" and lay.num_stages == 21 // block
    table = [(R(i, i + block), R(0, i), "block") for i in range(0, 21, block)]
    assert table_of(lay) == table
    assert torch.equal(lay.frame_visibility(), inference_mask(21, table))
    assert torch.equal(lay.training_visibility(), teacher_forcing_mask(21, table))
    # block-causal: frame i sees j iff j's block starts no later than i's
    i, j = torch.meshgrid(torch.arange(21), torch.arange(21), indexing="ij")
    assert torch.equal(lay.frame_visibility(), (j // block) <= (i // block))
    assert lay.handoff == {"terminal": (19, 20)}
    assert get_layout(f"ar{block}") == lay


def test_ar_default_and_tiny():
    assert get_layout("ar") == ar(21, 3)
    assert ar(1, 1).handoff == {"terminal": (0,)}
    assert ar(6, 2).num_stages == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block": 0}, "block must be a positive int"),
        ({"block": -3}, "block must be a positive int"),
        ({"block": 2.0}, "block must be a positive int"),
        ({"block": True}, "block must be a positive int"),
        ({"num_frames": 20, "block": 3}, "positive multiple of block=3"),
        ({"num_frames": 0, "block": 1}, "positive multiple"),
        ({"num_frames": 21.0, "block": 3}, "positive multiple"),
    ],
)
def test_ar_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ar(**kwargs)


# ----------------------------------------------------------------------------------------------- custom
def test_custom_layout():
    lay = custom("two-pass", 6, [((0, 1, 2), ()), ([5], [0, 2]), ((3, 4), (0, 1, 2, 5), "populate")])
    table = [((0, 1, 2), (), "block"), ((5,), (0, 2), "block"), ((3, 4), (0, 1, 2, 5), "populate")]
    assert table_of(lay) == table
    assert torch.equal(lay.frame_visibility(), inference_mask(6, table))
    assert torch.equal(lay.training_visibility(), teacher_forcing_mask(6, table))
    assert get_layout(lay) is lay


def test_custom_accepts_stages_bare_frames_and_kwargs():
    lay = custom("mix", 4, [Stage((0, 1), (), "start"), (2, 3)], handoff={"terminal": [2, 3]}, start_frames=2)
    assert table_of(lay) == [((0, 1), (), "start"), ((2, 3), (), "block")]
    assert lay.handoff == {"terminal": (2, 3)} and lay.start_frames == 2


def test_stage_normalises_sequences():
    s = Stage([2, 3], range(2), "plan")
    assert s.frames == (2, 3) and s.reads == (0, 1) and s.visible == (0, 1, 2, 3)
    assert Stage((torch.tensor(1),)).frames == (1,)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "num_frames, stages, match",
    [
        (3, [((0, 1), ()), ((1, 2), (0,))], r"frames \[1\] are produced twice"),
        (3, [((0, 1, 1), ())], "lists a frame twice"),
        (3, [((0,), ()), ((1, 2), (0, 0))], "lists a frame twice in its reads"),
        (3, [((0,), (1,)), ((1, 2), ())], r"reads frames \[1\] that no earlier stage produced"),
        (3, [((0,), ()), ((1, 2), (0, 2))], r"reads its own frames \[2\]"),
        (3, [((0, 1), ()), ((3,), ())], "frame 3 is outside 0..2"),
        (3, [((0, 1, 2), ()), ((-1,), ())], "frame -1 is outside 0..2"),
        (3, [((0, 1), ()), ((2,), (5,))], "frame 5 is outside 0..2"),
        (4, [((0, 1), ()), ((2,), (0,))], r"frames \[3\] are never produced"),
        (3, [((0, 1, 2), ()), ((), ())], "produces no frames"),
        (3, [], "needs at least one stage"),
        (0, [((0,), ())], "num_frames must be a positive int"),
    ],
)
def test_validation_errors(num_frames, stages, match):
    with pytest.raises(ValueError, match=match):
        custom("bad", num_frames, stages)


def test_validation_error_names_layout_and_stage():
    with pytest.raises(ValueError, match=r"layout 'bad' stage 1: frames \[1\] are produced twice"):
        custom("bad", 3, [((0, 1), ()), ((1, 2), (0,))])


def test_bad_role():
    with pytest.raises(ValueError, match=r"role 'keyframe' is not one of"):
        custom("bad", 2, [((0, 1), (), "keyframe")])
    with pytest.raises(TypeError, match="Stage.role"):
        Stage((0,), (), role=3)
    assert set(ROLES) == {"start", "plan", "populate", "block"}


def test_bad_handoff_and_start_frames():
    ok = [((0, 1), ()), ((2, 3), (0, 1))]
    with pytest.raises(ValueError, match="handoff 'terminal'"):
        custom("bad", 4, ok, handoff={"terminal": (3, 4)})
    with pytest.raises(ValueError, match="handoff 'terminal'"):
        custom("bad", 4, ok, handoff={"terminal": ()})
    with pytest.raises(ValueError, match="start_frames=3 must be within the first stage"):
        custom("bad", 4, ok, start_frames=3)
    with pytest.raises(TypeError, match="start_frames must be an int"):
        custom("bad", 4, ok, start_frames=1.0)
    with pytest.raises(TypeError, match="handoff"):
        custom("bad", 4, ok, handoff=[(2, 3)])


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Stage((0, 1.5)), "frame indices must be ints"),
        (lambda: Stage((0, True)), "frame indices must be ints"),
        (lambda: Stage(0), "expected a sequence of frame indices"),
        (lambda: Stage("01"), "expected a sequence of frame indices"),
        (lambda: Layout("bad", 2, [((0, 1), ())]), "expected a Stage"),
        (lambda: Layout("bad", 2, Stage((0, 1))), "stages must be a sequence of Stage"),
        (lambda: Layout("bad", 2.0, (Stage((0, 1)),)), "num_frames must be an int"),
        (lambda: Layout(3, 2, (Stage((0, 1)),)), "Layout.name"),
        (lambda: custom("bad", 2, [(0.0, ())]), "expected a sequence of frame indices"),
        (lambda: custom("bad", 2, [((0, 1), (), "start", "extra")]), "expected"),
        (lambda: custom("bad", 2, 5), "stages: expected a sequence"),
        (lambda: custom("bad", 2, ["01"]), r"stages\[0\]"),
        (lambda: get_layout(3), "layout must be a name or a Layout"),
    ],
)
def test_wrong_types_raise_type_error(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_layout_accepts_a_list_of_stages():
    lay = Layout("list", 2, [Stage((0, 1))])
    assert isinstance(lay.stages, tuple)
    hash(lay)  # frozen and hashable


def test_unknown_layout_name():
    with pytest.raises(ValueError, match=r"unknown layout 'mmpl2'; choose one of mmpl, mmpl-no-early"):
        get_layout("mmpl2")
    with pytest.raises(ValueError, match="block must be a positive int"):
        get_layout("ar0")
    with pytest.raises(ValueError, match="positive multiple of block=4"):
        get_layout("ar4")


def test_all_builtins_valid():
    for name, make in LAYOUTS.items():
        lay = make()
        validate(lay)
        assert lay.frame_visibility().diagonal().all()
        assert get_layout(name) == lay


def test_stage_of_unknown_frame():
    with pytest.raises(ValueError, match="frame 30 is not in layout 'mmpl'"):
        mmpl().stage_of(30)


def test_visibility_is_stage_causal():
    """Training and inference agree: the clean block of the training mask is the inference mask, and noisy
    tokens see exactly their stage's noisy tokens plus the clean tokens of the frames the stage reads."""
    for make in LAYOUTS.values():
        lay = make()
        n = lay.num_frames
        tv, fv = lay.training_visibility(), lay.frame_visibility()
        assert torch.equal(tv[:n, :n], fv)
        assert not tv[:n, n:].any()
        noisy_clean = tv[n:, :n]
        noisy_noisy = tv[n:, n:]
        assert torch.equal(noisy_clean | noisy_noisy, fv)
        assert not (noisy_clean & noisy_noisy).any()


def test_stages_for_follows_reads_back_to_the_start():
    lay = mmpl()
    assert lay.stages_for(range(21)) == (0, 1, 2, 3)
    assert lay.stages_for(range(13)) == (0, 1, 2)  # the middle chain's kept frames
    assert lay.stages_for([19]) == (0, 1)  # a keyframe needs only the plan and its start
    assert lay.stages_for([]) == ()
    assert ar(block=3).stages_for([7]) == (0, 1, 2)
    with pytest.raises(ValueError, match=r"frames 0..20; asked for \[21\]"):
        lay.stages_for([3, 21])

"""Names of the effects world's labels: single effects, compounds "motion+look", the named sets the jobs take
(`--effects train`, `combo-heldout`, ...), and what each label is made of. No rendering here (`world.py`)."""

from __future__ import annotations

from typing import Iterable

#: Effects seen while training the hypernetwork.
TRAIN_EFFECTS: tuple[str, ...] = (
    "colour_cycle",  # the shape's hue rotates over time
    "spin",          # the whole view rotates about the frame centre
    "zoom_in",       # the view magnifies about the shape (up to 2.2x)
    "slide_left",    # the shape moves from right to left
    "flicker",       # brightness alternates bright / dim every frame
    "fade_out",      # the whole frame fades to black
    "pixelate",      # block size grows 1 -> size/4
    "melt_down",     # the shape drips downward, column by column
    "shake",         # the view jitters randomly
    "blur_in",       # starts heavily blurred, ends sharp
)
#: Effects never seen in hypernetwork training (generalisation test).  Two are
#: mirror images of training effects, two are new.
HELDOUT_EFFECTS: tuple[str, ...] = (
    "zoom_out",      # the view shrinks about the shape (down to 1/3)
    "slide_right",   # the shape moves from left to right
    "invert",        # colours invert at mid clip
    "burst",         # the shape swells, fades and throws particles outward
)
#: All effects, in classifier label order.
EFFECTS: list[str] = list(TRAIN_EFFECTS + HELDOUT_EFFECTS)
#: The static "no effect" class (pretraining / sanity only; not in ``EFFECTS``).
NONE = "none"
ALL_LABELS: list[str] = EFFECTS + [NONE]

# Compound effects: a motion and a look at once, written "motion+look" ("spin+invert").  They test zero-shot
# transfer to *new effects made of known parts*: the hypernetwork trains on COMBO_TRAIN and never sees a
# COMBO_HELDOUT clip, although each held-out effect's motion and look appear in training with other partners.
MOTIONS: tuple[str, ...] = ("spin", "zoom_in", "zoom_out", "slide_left", "slide_right", "shake", "melt_down")
LOOKS: tuple[str, ...] = ("colour_cycle", "flicker", "fade_out", "pixelate", "blur_in", "invert")
COMBOS: list[str] = [f"{m}+{k}" for m in MOTIONS for k in LOOKS]
#: one held-out compound per motion; the looks are those a per-effect LoRA can make on the small backbone
#: (colour_cycle and flicker it cannot: docs/EFFECTS.md), each held out at most twice
COMBO_HELDOUT: tuple[str, ...] = ("spin+fade_out", "zoom_in+invert", "zoom_out+pixelate", "slide_left+blur_in",
                                  "slide_right+invert", "shake+pixelate", "melt_down+fade_out")
COMBO_TRAIN: tuple[str, ...] = tuple(c for c in COMBOS if c not in COMBO_HELDOUT)
#: the seen compounds the benchmark reports next to the held-out ones: one per motion, looks of the same set
COMBO_EVAL_SEEN: tuple[str, ...] = ("spin+pixelate", "zoom_in+fade_out", "zoom_out+invert", "slide_left+pixelate",
                                    "slide_right+fade_out", "shake+blur_in", "melt_down+invert")
#: every label of the compound world: single effects, compounds and the static class (backbone and judge)
COMBO_WORLD: list[str] = ALL_LABELS + COMBOS
#: the compounds' parts alone ("zoom_in", "invert"): `jobs/recipe.py --train-parts` adds them to the hypernetwork's
#: training clips, so each motion is also seen with no look and each look with no motion. They are training labels
#: there, although the single-effects world holds zoom_out, slide_right and invert out (`make_dataset(train_labels=)`)
COMBO_PARTS: tuple[str, ...] = MOTIONS + LOOKS


# Effect families with a continuous parameter, written "family@value" ("slide@45"): held-out effects can then be
# new points of a space the hypernetwork learned. Several named effects are points of these families (rendered
# bit for bit the same way): spin = spin@270, zoom_in = zoom@2.2, zoom_out = zoom@0.3333, slide_left = slide@180,
# slide_right = slide@0, fade_out = fade@1.
#: family -> (what the value is, lowest, highest)
MOTION_FAMILIES: dict[str, tuple[str, float, float]] = {
    "spin": ("degrees the view turns over the clip, counter-clockwise", -360.0, 360.0),
    "zoom": ("magnification of the view at the end (below 1: zooms out)", 0.25, 3.0),
    "slide": ("direction the shape travels, degrees (0 = right, 90 = up)", 0.0, 360.0),
    "wave": ("amplitude of a growing horizontal ripple of the view, in frame half-widths", 0.0, 0.3),
}
LOOK_FAMILIES: dict[str, tuple[str, float, float]] = {
    "hue": ("degrees the shape's hue turns over the clip", -360.0, 360.0),
    "fade": ("how much darker the last frame is (1: black)", 0.0, 1.0),
    "blur": ("blur of the last frame, Gaussian sigma in pixels of a 32-pixel frame", 0.0, 4.0),
}
#: named effects that are points of a family: name -> (family, value)
FAMILY_POINTS: dict[str, tuple[str, float]] = {
    "spin": ("spin", 270.0), "zoom_in": ("zoom", 2.2), "zoom_out": ("zoom", 1.0 / 3.0), "slide_left": ("slide", 180.0),
    "slide_right": ("slide", 0.0), "fade_out": ("fade", 1.0),
}


# The family world (`--world families`): compounds of family points "motion@v+look@v". The hypernetwork trains on
# 36 pairings of a grid (FAMILY_TRAIN) and is tested on three kinds of held-out effect it never saw: new pairings
# of grid points, new points between grid points (spin@180 lies between 90 and 270), and a whole new family
# (wave, a motion no training clip has). The backbone and the judge learn every label of the world.
FAMILY_MOTION_GRID: tuple[str, ...] = ("spin@-270", "spin@-90", "spin@90", "spin@270", "zoom@0.3", "zoom@0.6",
                                       "zoom@1.6", "zoom@2.8", "slide@0", "slide@90", "slide@180", "slide@270")
FAMILY_LOOK_GRID: tuple[str, ...] = ("hue@-240", "hue@-120", "hue@120", "hue@240", "fade@0.5", "fade@1", "blur@1.5",
                                     "blur@4")
#: families no hypernetwork training clip has (the held-out family test)
HELDOUT_FAMILIES: tuple[str, ...] = ("wave",)
#: motion i with looks 3i, 3i+1, 3i+2 (mod 8): every motion family meets every look family, each look 4-5 times
FAMILY_TRAIN: tuple[str, ...] = tuple(f"{m}+{FAMILY_LOOK_GRID[(3 * i + j) % 8]}"
                                      for i, m in enumerate(FAMILY_MOTION_GRID) for j in range(3))
FAMILY_HELDOUT_PAIRINGS: tuple[str, ...] = tuple(f"{FAMILY_MOTION_GRID[i]}+{FAMILY_LOOK_GRID[(3 * i + 4) % 8]}"
                                                 for i in (0, 5, 10, 3))  # grid points, never together in training
FAMILY_HELDOUT_POINTS: tuple[str, ...] = ("spin@180+fade@1", "zoom@2.2+hue@-120", "slide@135+blur@1.5",
                                          "spin@-90+hue@180", "zoom@0.6+fade@0.75", "slide@270+blur@2.75")
FAMILY_HELDOUT_FAMILY: tuple[str, ...] = ("wave@0.25+hue@120", "wave@0.25+fade@1", "wave@0.25+blur@4")
FAMILY_HELDOUT: tuple[str, ...] = FAMILY_HELDOUT_PAIRINGS + FAMILY_HELDOUT_POINTS + FAMILY_HELDOUT_FAMILY
#: the seen compounds the evaluation reports next to the held-out ones: spread over the grid's families
FAMILY_EVAL_SEEN: tuple[str, ...] = FAMILY_TRAIN[0::5][:7]
#: every label of the family world (backbone and judge): the compounds and the static class
FAMILY_WORLD: list[str] = list(FAMILY_TRAIN + FAMILY_HELDOUT) + ["none"]


def family_point(part: str) -> tuple[str, float] | None:
    """(family, value) of one part ("slide@45" -> (slide, 45.0); "slide_left" -> (slide, 180.0)), None for a named
    effect that is no point of a family ("invert"). Raises ValueError naming the part if it is malformed."""
    if part in FAMILY_POINTS:
        return FAMILY_POINTS[part]
    if "@" not in part:
        return None
    family, _, value = part.partition("@")
    bounds = {**MOTION_FAMILIES, **LOOK_FAMILIES}.get(family)
    if bounds is None:
        raise ValueError(f"effect part {part!r}: unknown family {family!r}; families: "
                         f"{sorted(MOTION_FAMILIES) + sorted(LOOK_FAMILIES)}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"effect part {part!r}: {value!r} is not a number") from None
    if not bounds[1] <= v <= bounds[2]:
        raise ValueError(f"effect part {part!r}: {family} takes {bounds[0]} from {bounds[1]:g} to {bounds[2]:g}")
    return family, v


def _is_motion(part: str) -> bool:
    return part in MOTIONS or part == "burst" or (
        "@" in part and family_point(part) is not None and family_point(part)[0] in MOTION_FAMILIES)


def _is_look(part: str) -> bool:
    return part in LOOKS or ("@" in part and family_point(part) is not None and family_point(part)[0] in LOOK_FAMILIES)


def effect_parts(effect: str) -> frozenset[str]:
    """The single effects a label is made of: ``"spin+invert"`` -> {spin, invert}; ``"none"`` -> {}.

    A compound is one motion (of MOTIONS or a motion family, "slide@45") and one look (of LOOKS or a look family,
    "hue@90"); a family point alone ("zoom@1.5") is a single effect."""
    if effect in ALL_LABELS:
        return frozenset() if effect == NONE else frozenset([effect])
    parts = effect.split("+")
    try:
        ok = (len(parts) == 1 and "@" in parts[0] and family_point(parts[0]) is not None) or (
            len(parts) == 2 and _is_motion(parts[0]) and _is_look(parts[1]))
    except ValueError as e:
        raise ValueError(f"effect {effect!r}: {e}") from None
    if not ok:
        raise ValueError(f"unknown effect {effect!r}; known: {ALL_LABELS}, 'motion+look' with motion in "
                         f"{list(MOTIONS)} and look in {list(LOOKS)}, or family points 'family@value' of "
                         f"{sorted(MOTION_FAMILIES)} (motions) and {sorted(LOOK_FAMILIES)} (looks)")
    return frozenset(parts)


def effect_factors(effect: str) -> tuple[str, str]:
    """(motion, look) of a label, "none" where it has none: "spin+invert" -> (spin, invert), "invert" -> (none,
    invert), "burst" -> (burst, none)."""
    parts = effect_parts(effect)
    look = next((e for e in parts if _is_look(e)), NONE)
    motion = next((e for e in parts if e != look), NONE)
    return motion, look


_NAMED_SETS = {
    "all": EFFECTS, "train": TRAIN_EFFECTS, "heldout": HELDOUT_EFFECTS, "held_out": HELDOUT_EFFECTS,
    "test": HELDOUT_EFFECTS, "combo": COMBOS, "combo-train": COMBO_TRAIN, "combo-heldout": COMBO_HELDOUT,
    "combo-world": COMBO_WORLD, "combo-eval": COMBO_EVAL_SEEN + COMBO_HELDOUT,
    "combo-parts": COMBO_PARTS, "combo-with-parts": COMBOS + list(COMBO_PARTS),
    "families": FAMILY_TRAIN + FAMILY_HELDOUT, "families-train": FAMILY_TRAIN, "families-heldout": FAMILY_HELDOUT,
    "families-world": FAMILY_WORLD, "families-eval": FAMILY_EVAL_SEEN + FAMILY_HELDOUT,
}


def resolve_effects(effects: str | Iterable[str] | None) -> list[str]:
    """``None``/"all" -> EFFECTS, "train" -> TRAIN_EFFECTS, "heldout" -> HELDOUT_EFFECTS, "combo",
    "combo-train", "combo-heldout", "combo-world", "combo-eval", "combo-parts", "combo-with-parts" -> the compound
    sets, "families", "families-train", "families-heldout", "families-world", "families-eval" -> the family world's
    sets, or an explicit comma-separated list (validated; may include ``"none"`` and compounds ``"motion+look"``)."""
    if effects is None:
        return list(EFFECTS)
    if isinstance(effects, str) and effects in _NAMED_SETS:
        return list(_NAMED_SETS[effects])
    if isinstance(effects, str):
        effects = effects.split(",")
    out = [e.replace(" ", "") for e in effects if e.strip()]  # "spin + invert" is spin+invert
    if not out:
        raise ValueError(f"no effects given ({effects!r}); known sets: {sorted(_NAMED_SETS)}")
    for e in out:
        effect_parts(e)  # raises naming the bad label
    return out


def effect_slug(effect: str) -> str:
    """The label as a file / sample name ([A-Za-z0-9._-]): spin+invert -> spin-invert, slide@45+hue@90 ->
    slide_45-hue_90."""
    return effect.replace("+", "-").replace("@", "_")


def effect_split(effect: str) -> str:
    """'heldout' for held-out effects (single, compound, or of the family world: any label with a part of a
    HELDOUT_FAMILIES family counts), else 'train' (``none`` counts as train)."""
    held = effect in HELDOUT_EFFECTS or effect in COMBO_HELDOUT or effect in FAMILY_HELDOUT
    return "heldout" if held or held_out_family(effect) else "train"


def held_out_family(effect: str) -> bool:
    """Whether a label has a part of a family no hypernetwork training clip has ("wave@0.25+fade@1")."""
    return any(part.partition("@")[0] in HELDOUT_FAMILIES for part in effect.split("+") if "@" in part)

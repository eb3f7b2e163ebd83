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


def effect_parts(effect: str) -> frozenset[str]:
    """The single effects a label is made of: ``"spin+invert"`` -> {spin, invert}; ``"none"`` -> {}.

    A compound is one motion of MOTIONS and one look of LOOKS."""
    if effect in ALL_LABELS:
        return frozenset() if effect == NONE else frozenset([effect])
    parts = effect.split("+")
    if len(parts) != 2 or parts[0] not in MOTIONS or parts[1] not in LOOKS:
        raise ValueError(f"unknown effect {effect!r}; known: {ALL_LABELS} or 'motion+look' with motion in "
                         f"{list(MOTIONS)} and look in {list(LOOKS)}")
    return frozenset(parts)


def effect_factors(effect: str) -> tuple[str, str]:
    """(motion, look) of a label, "none" where it has none: "spin+invert" -> (spin, invert), "invert" -> (none,
    invert), "burst" -> (burst, none)."""
    parts = effect_parts(effect)
    look = next((e for e in parts if e in LOOKS), NONE)
    motion = next((e for e in parts if e != look), NONE)
    return motion, look


_NAMED_SETS = {
    "all": EFFECTS, "train": TRAIN_EFFECTS, "heldout": HELDOUT_EFFECTS, "held_out": HELDOUT_EFFECTS,
    "test": HELDOUT_EFFECTS, "combo": COMBOS, "combo-train": COMBO_TRAIN, "combo-heldout": COMBO_HELDOUT,
    "combo-world": COMBO_WORLD, "combo-eval": COMBO_EVAL_SEEN + COMBO_HELDOUT,
}


def resolve_effects(effects: str | Iterable[str] | None) -> list[str]:
    """``None``/"all" -> EFFECTS, "train" -> TRAIN_EFFECTS, "heldout" -> HELDOUT_EFFECTS, "combo",
    "combo-train", "combo-heldout", "combo-world", "combo-eval" -> the compound sets, or an explicit comma-separated
    list (validated; may include ``"none"`` and compounds ``"motion+look"``)."""
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
    """The label as a file / sample name ([A-Za-z0-9._-]): spin+invert -> spin-invert."""
    return effect.replace("+", "-")


def effect_split(effect: str) -> str:
    """'heldout' for held-out effects (single or compound), else 'train' (``none`` counts as train)."""
    return "heldout" if effect in HELDOUT_EFFECTS or effect in COMBO_HELDOUT else "train"

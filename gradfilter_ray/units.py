"""Unit keys (pure: no Ray, no I/O): each unit of work inside a stage keyed by exactly its own inputs, so a config
change redoes the units it affects and no other. A unit's output lives side by side with those of other configs,
under a name that ends in its key (`unit_name`); the stage's manifest record maps the unit's name in this config to
it, and `RunDir.add_references` records it for `gc`.

The ensemble's members are keyed here (the ensemble writes them and the extraction reads them, and neither package
imports the other); the keys of fine-tuned subsets, evaluated runs and judged pairs live with the stages that write
them. `unit_finished` (the one function here that reads storage) tells whether a unit's folder holds its finished
output under a given key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradfilter_ray.config import Config, keyed_value, section_hash

if TYPE_CHECKING:
    from gradfilter_ray.storage import Location

MEMBER_DONE = "_done"  # in a member's folder, written after its last epoch: the member is finished
DONE_MARKER = "_done"  # in a fine-tuned subset's or an evaluated run's folder, written last: holds the unit's key
UNIT_NAME = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{16})")


def unit_name(name: str, key: str) -> str:
    """'gsnr_0.1' and its key -> 'gsnr_0.1-<key>': readable, and unique to what it holds."""
    return f"{name}-{key}"


def unit_finished(folder: Location, key: str) -> bool:
    """Whether `folder` holds a finished unit of this key: its `DONE_MARKER`, written after the unit's last file,
    names the key (a folder cut short has no marker; one of another key was written for other inputs)."""
    marker = folder / DONE_MARKER
    return marker.exists() and marker.read_text().strip() == key


def member_seed(cfg: Config, member: int) -> int:
    return cfg.ensemble.seed + member


# Ensemble fields that key the ensemble stage but not a member: how many members, the base seed (each member's own
# seed stands for both) and the epochs the extraction reads (every epoch is saved; the `gradients` key carries them).
NOT_MEMBER_FIELDS = ("members", "seed", "early_epoch", "late_epoch")


def member_key(cfg: Config, tokens_key: str, seed: int) -> str:
    """A member's key: the proxy, every ensemble field that changes a member's training (not how many members there
    are, nor the base seed: the member's own seed stands for both; nor which epochs the extraction reads, since every
    epoch is saved), its seed, and the tokens it trains on (the `tokens` stage's key). Two configs whose seeds overlap
    share those members."""
    fields = {k: v for k, v in keyed_value(cfg, "ensemble").items() if k not in NOT_MEMBER_FIELDS}
    return section_hash("ensemble-member", keyed_value(cfg, "proxy"), fields, seed, tokens_key)


def member_names(cfg: Config, tokens_key: str) -> list[str]:
    """Each member's folder name under `ensemble/`, in member order: `member_seed{seed}-{key}`."""
    return [m.folder for m in ensemble_members(cfg, tokens_key)]


@dataclass(frozen=True)
class Member:
    """One ensemble member of a config: its place in the config's ensemble, its seed and its folder's name."""

    index: int
    seed: int
    folder: str

    @property
    def unit(self) -> str:
        """Its name in this config's `units` map (the ensemble's manifest record): 'member_0', 'member_1', ..."""
        return member_unit(self.index)


def member_unit(index: int) -> str:
    return f"member_{index}"


def ensemble_members(cfg: Config, tokens_key: str) -> list[Member]:
    """The config's members in member order, each with its seed and folder name (`member_seed{seed}-{key}`)."""
    seeds = [member_seed(cfg, m) for m in range(cfg.ensemble.members)]
    return [Member(m, s, unit_name(f"member_seed{s}", member_key(cfg, tokens_key, s))) for m, s in enumerate(seeds)]

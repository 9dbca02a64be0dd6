"""Unit keys (pure: no Ray, no I/O): each unit of work inside a stage keyed by exactly its own inputs, so a config
change redoes the units it affects and no other. A unit's output lives side by side with those of other configs,
under a name that ends in its key (`unit_name`); the stage's manifest record maps the unit's name in this config to
it, and `RunDir.add_references` records it for `gc`.

The ensemble's members are keyed here (the ensemble writes them and the extraction reads them, and neither package
imports the other); the keys of fine-tuned subsets, evaluated runs and judged pairs live with the stages that write
them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradfilter_ray.config import Config, keyed_value, section_hash

MEMBER_DONE = "_done"  # in a member's folder, written after its last epoch: the member is finished
UNIT_NAME = re.compile(r"(?P<name>.+)-(?P<key>[0-9a-f]{16})")


def unit_name(name: str, key: str) -> str:
    """'gsnr_0.1' and its key -> 'gsnr_0.1-<key>': readable, and unique to what it holds."""
    return f"{name}-{key}"


def member_seed(cfg: Config, member: int) -> int:
    return cfg.ensemble.seed + member


def member_key(cfg: Config, tokens_key: str, seed: int) -> str:
    """A member's key: the proxy, every ensemble field that changes a member's training (not how many members there
    are, nor the base seed: the member's own seed stands for both), its seed, and the tokens it trains on (the
    `tokens` stage's key). Two configs whose seeds overlap share those members."""
    fields = {k: v for k, v in keyed_value(cfg, "ensemble").items() if k not in ("members", "seed")}
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

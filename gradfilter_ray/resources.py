"""What each stage asks Ray for, declared once (pure: no Ray, no I/O).

A `Request` says what runs (Ray Train workers, Ray Data actors or a Ray task), how many (None: as many as the cluster
holds), the CPUs and GPUs each one takes and, for Ray Train, the placement strategy of one worker group. The stage
table (`pipeline.STAGES`) shows it, in `run --dry-run`'s plan and on the "[stage] running (...)" line, and each
stage's Ray shell builds Ray's arguments from the same Request (`ray_resources` for a ScalingConfig's
resources_per_worker, `use_gpu`, `remote_args` for an actor pool's or a task's num_cpus and num_gpus), so what the
table shows is what the stage asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gradfilter_ray.config import Config

TRAIN_WORKERS = "Ray Train workers"
DATA_ACTORS = "Ray Data actors"
TASK = "Ray task"


@dataclass(frozen=True)
class Request:
    runs: str  # TRAIN_WORKERS, DATA_ACTORS or TASK
    count: int | None  # None: as many as the cluster holds
    cpus: float  # per worker, actor or task
    gpus: float = 0.0  # per worker, actor or task; a fraction shares a GPU
    placement: str | None = None  # Ray Train's placement strategy for one group of workers
    scope: str = ""  # what one request serves, shown before it ("per subset")
    note: str = ""  # shown right after it, its own punctuation included

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def ray_resources(self) -> dict[str, float]:
        """Ray's resources for one worker, actor or task: {"CPU": cpus}, with "GPU" only when it asks for GPUs."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.use_gpu else {})}

    def remote_args(self) -> dict[str, float]:
        """num_cpus, and num_gpus only when it asks for GPUs: the options of a Ray task or a Ray Data actor pool."""
        return {"num_cpus": self.cpus, **({"num_gpus": self.gpus} if self.use_gpu else {})}

    def with_count(self, count: int) -> Request:
        """The same request for `count` of them (the shell's own width: the members still to train, say)."""
        return replace(self, count=count)

    def __str__(self) -> str:
        """The one-line view: '5 Ray Train workers x (4.0 CPU, 1.0 GPU)', '1 Ray task'."""
        what = f"{self.count} {self.runs}" if self.count is not None else f"{self.runs} (as many as the cluster holds)"
        if self.runs != TASK:
            what += f" x ({self.cpus} CPU, {self.gpus} GPU)" + (f", {self.placement}" if self.placement else "")
        return " ".join(part for part in (self.scope, what) if part) + self.note


# A stage's small work (scoring, selection, the report, the data stage's last step): one task of one CPU, next to
# the data rather than on the driver (`runtime.run_as_task`).
ONE_TASK = Request(TASK, 1, cpus=1)


def one_task(cfg: Config) -> Request:
    return ONE_TASK


def data_tasks(cfg: Config) -> Request:
    """The data and tokens stages: Ray Data's read, map and write tasks (`runtime.IO_REMOTE_ARGS`), then one task."""
    return replace(ONE_TASK, scope="Ray Data tasks +")


def member_trainers(cfg: Config) -> Request:
    """The ensemble: one Ray Train worker per member (the shell asks for one per member still to train)."""
    e = cfg.ensemble
    return Request(TRAIN_WORKERS, e.members, e.cpus_per_member, e.gpus_per_member)


def extraction_actors(cfg: Config) -> Request:
    """The gradients stage: a pool of `num_actors` extraction actors (fewer when fewer shards are left)."""
    g = cfg.gradients
    return Request(DATA_ACTORS, g.num_actors, g.cpus_per_actor, g.gpus_per_actor)


def subset_trainers(cfg: Config) -> Request:
    """The finetune stage: one Ray Train worker group per subset, subsets side by side as `placement` allows."""
    t = cfg.finetune
    side = t.parallel_subsets or "as many as the cluster holds"
    return Request(
        TRAIN_WORKERS,
        t.num_workers,
        t.cpus_per_worker,
        t.gpus_per_worker,
        placement=t.placement_strategy,
        scope="per subset",
        note=f", ZeRO-{t.zero_stage}; subsets side by side: {side}",
    )


def evaluation_actors(cfg: Config) -> Request:
    """The evaluation: actors shared out over the runs (`evaluation.plan`), as many as the cluster holds unless
    `num_actors` says."""
    e = cfg.evaluation
    return Request(
        DATA_ACTORS, e.num_actors, e.cpus_per_actor, e.gpus_per_actor, note=f" shared over the runs, engine {e.engine}"
    )


def audit_tasks(cfg: Config) -> Request:
    """The audit: a task that plants its sample and one that measures the recovery, around its own inner stages
    (each of which shows its own request when it runs)."""
    inner = f"its own tokens, ensemble ({member_trainers(cfg)}), gradients and scoring"
    return replace(ONE_TASK, note=f" before and after {inner} on {cfg.audit.rows} sampled rows")

"""Judged pairs as units, without Ray: the evaluation stage's judging on two evaluated runs' answer files and a
real local judge endpoint. A pair the judge answered in full is kept in its file and never judged again; a pair
with a failed request is summarised but not kept, and the next run asks the judge only for the replies it lacks
(the others come from the judge cache)."""

from __future__ import annotations

import json

from conftest import ChatServer, reply, status

from gradfilter_ray.config import load
from gradfilter_ray.evaluation.stage import EvaluatedRun, judge_runs
from gradfilter_ray.rundir import RunDir

PROMPTS = ["Name a colour.", "Name a fruit.", "Name a tree."]


def write_answers(rundir: RunDir, run: EvaluatedRun, answers: list[str]) -> None:
    rows = [
        {"test_set": "vicuna", "id": str(i), "instruction": q, "input": "", "answer": a}
        for i, (q, a) in enumerate(zip(PROMPTS, answers))
    ]
    (rundir.at(run.folder) / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_pair_is_kept_once_the_judge_replied_to_every_request(tmp_path):
    failing = {"on": True}

    def respond(body: dict) -> tuple:
        prompt = body["messages"][-1]["content"]
        ours_first = "Assistant 1's Answer]\nA long answer." in prompt
        if failing["on"] and "fruit" in prompt and ours_first:
            return status(400, "refused")  # the fruit prompt's first order, the first time round
        return reply("8 4" if ours_first else "4 8")

    judge = ChatServer(respond)
    try:
        cfg = load(
            None,
            [f"output_dir={tmp_path}", f"evaluation.judge.base_url={judge.url}/v1", "evaluation.judge.max_retries=0"],
        )
        rundir = RunDir(str(tmp_path))
        runs = {
            "gsnr_0.1": EvaluatedRun("gsnr_0.1", "finetune/gsnr_0.1-0000000000000001", 10, "000000000000000a"),
            "random_0.1": EvaluatedRun("random_0.1", "finetune/random_0.1-0000000000000002", 10, "000000000000000b"),
        }
        write_answers(rundir, runs["gsnr_0.1"], ["A long answer."] * 3)
        write_answers(rundir, runs["random_0.1"], ["Short."] * 3)
        log = []

        first = judge_runs(cfg, rundir, "stagekey", runs, log=log.append)
        assert len(judge.requests) == 6  # 3 prompts, both orders
        assert first["judged"] == first["incomplete"] == ["gsnr_0.1_vs_random_0.1"]
        pair = rundir.at(first["pairs"]["gsnr_0.1_vs_random_0.1"])
        assert not pair.exists() and first["runs"]["gsnr_0.1"]["overall"]["invalid"] == 1
        assert rundir.references("evaluation", "stagekey") == {first["pairs"]["gsnr_0.1_vs_random_0.1"]}
        assert any("did not reply to every request of gsnr_0.1_vs_random_0.1" in line for line in log)

        failing["on"] = False
        second = judge_runs(cfg, rundir, "stagekey", runs, log=log.append)
        assert len(judge.requests) == 7  # only the reply it lacked: the other five come from the cache
        assert second["judged"] == ["gsnr_0.1_vs_random_0.1"] and second["incomplete"] == []
        outcomes = [json.loads(line)["outcome"] for line in pair.read_text().splitlines()]
        assert outcomes == ["win"] * 3 and second["runs"]["gsnr_0.1"]["overall"]["pws"] == 2.0

        third = judge_runs(cfg, rundir, "stagekey", runs, log=log.append)
        assert len(judge.requests) == 7 and third["judged"] == [] and third["runs"] == second["runs"]

        # other answers are another pair: judged anew, the first pair's file left as it is
        write_answers(rundir, runs["random_0.1"], ["Short."] * 2 + ["Brief."])
        fourth = judge_runs(cfg, rundir, "stagekey", runs, log=log.append)
        assert fourth["pairs"] != second["pairs"] and fourth["judged"] == ["gsnr_0.1_vs_random_0.1"]
        assert pair.exists() and rundir.at(fourth["pairs"]["gsnr_0.1_vs_random_0.1"]).exists()
    finally:
        judge.close()

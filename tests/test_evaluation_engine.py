"""Evaluation engines and width, the parts that run without a GPU: the prompt ids both engines are given, the
vLLM sampling parameters and processor config (validated by Ray's own `vLLMEngineProcessorConfig`), the mapping of
vLLM's output rows back to prompts, the engine choice, and how actors are shared out between runs. The vLLM run
itself is not exercised here (no vLLM, no GPU)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from gradfilter_ray.config import ConfigError, load
from gradfilter_ray.evaluation import vllm_engine
from gradfilter_ray.evaluation.generate import Sampling, decode_answers, prompt_token_ids
from gradfilter_ray.evaluation.hf_engine import GENERATE, HELDOUT, batch_blocks
from gradfilter_ray.evaluation.plan import MAX_CPU_ACTORS, choose_engine, cluster_width, plan_waves, share
from gradfilter_ray.storage import open_location

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
RESPONSE = "### Response:"


# -- the prompt both engines see --------------------------------------------------------------------------------


def test_prompt_ids_start_with_bos_where_it_is_distinct_and_end_with_the_response_marker(llama_tokenizer):
    ids = prompt_token_ids(llama_tokenizer, ["Name a colour.", "Add"], ["", "2 and 3"], 1024)
    texts = [llama_tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert [row[0] for row in ids] == [llama_tokenizer.bos_token_id] * 2
    assert all(text.endswith(RESPONSE) for text in texts), texts
    assert ["### Input:" in text for text in texts] == [False, True]  # a row with an input gets that template


def test_prompt_ids_have_no_bos_when_it_is_the_eos(gpt2_tokenizer):
    (row,) = prompt_token_ids(gpt2_tokenizer, ["Name a colour."], [""], 1024)
    assert gpt2_tokenizer.bos_token_id == gpt2_tokenizer.eos_token_id and row[0] != gpt2_tokenizer.bos_token_id


def test_long_prompts_lose_their_beginning_never_the_response_marker(llama_tokenizer):
    full, cut = (prompt_token_ids(llama_tokenizer, ["word " * 300], [""], n)[0] for n in (10_000, 40))
    assert len(full) > 40 and cut == full[-40:]


def test_decoding_drops_eos_and_padding(llama_tokenizer):
    ids = llama_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    eos = llama_tokenizer.eos_token_id
    assert decode_answers(llama_tokenizer, [ids + [eos, eos], ids]) == ["Once upon a time"] * 2


# -- vLLM: sampling parameters, processor config, rows in and out -----------------------------------------------


def test_greedy_maps_to_temperature_zero_with_the_same_length_and_ids_only():
    assert vllm_engine.sampling_params(Sampling(max_new_tokens=77)) == {
        "max_tokens": 77,
        "detokenize": False,
        "temperature": 0.0,
    }
    sampled = vllm_engine.sampling_params(Sampling(max_new_tokens=5, do_sample=True, temperature=0.5, top_p=0.8))
    assert sampled == {"max_tokens": 5, "detokenize": False, "temperature": 0.5, "top_p": 0.8, "seed": 0}


ALLOC = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def config_for(**overrides):
    kwargs = {
        "actors": 3,
        "batch_size": 16,
        "cpus_per_actor": 2.0,
        "gpus_per_actor": 1.0,
        "sampling": Sampling(max_new_tokens=1024, max_prompt_tokens=1024),
        "model_max_len": 4096,
    }
    return vllm_engine.processor_config("/mnt/shared/run/finetune/gsnr_0.05/model", **{**kwargs, **overrides})


def test_processor_config_is_accepted_by_rays_vllm_config_as_built():
    from ray.data.llm import vLLMEngineProcessorConfig

    accepted = vLLMEngineProcessorConfig(**config_for()).model_dump()
    assert accepted["model_source"] == "/mnt/shared/run/finetune/gsnr_0.05/model"
    assert accepted["concurrency"] == (3, 3) and accepted["batch_size"] == 16  # a fixed pool of this run's share
    assert accepted["max_tasks_in_flight_per_actor"] == accepted["max_concurrent_batches"]  # no hoarding
    assert not accepted["chat_template_stage"] and not accepted["tokenize_stage"] and not accepted["detokenize_stage"]
    engine = accepted["engine_kwargs"]
    assert (
        engine["max_model_len"] == 2048 and engine["tensor_parallel_size"] == 1 and engine["task_type"] == "generate"
    )
    assert engine["dtype"] == "bfloat16" and "gpu_memory_utilization" not in engine
    assert accepted["placement_group_config"]["bundles"] == [{"CPU": 2.0, "GPU": 1.0}]


def test_processor_config_for_gpu_shares_whole_gpus_and_overrides():
    from ray.data.llm import vLLMEngineProcessorConfig

    shared = config_for(gpus_per_actor=0.5)
    assert shared["engine_kwargs"]["gpu_memory_utilization"] == 0.45  # its share, not vLLM's 90 % of the GPU
    assert shared["placement_group_config"]["bundles"] == [{"CPU": 2.0, "GPU": 0.5}]
    sharded = config_for(gpus_per_actor=2.0)
    assert sharded["engine_kwargs"]["tensor_parallel_size"] == 2 and "placement_group_config" not in sharded
    assert "runtime_env" not in sharded  # the user set the allocator: theirs stands
    assert "runtime_env" not in config_for(allocator_env=ALLOC)  # one GPU: the job's expandable segments stay on
    # and off for an engine whose tensor-parallel ranks share CUDA-graph buffers
    sharded_ours = vLLMEngineProcessorConfig(**config_for(gpus_per_actor=2.0, allocator_env=ALLOC)).model_dump()
    assert sharded_ours["runtime_env"] == {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}}
    short_model = config_for(model_max_len=1500)
    assert short_model["engine_kwargs"]["max_model_len"] == 1500  # never past the model's context
    tuned = config_for(extra_engine_kwargs={"max_num_seqs": 64, "enable_prefix_caching": False})
    assert tuned["engine_kwargs"]["max_num_seqs"] == 64 and tuned["engine_kwargs"]["enable_prefix_caching"] is False


def test_rows_go_in_with_their_positions_and_come_back_in_order_whatever_the_order_they_finish_in():
    rows = vllm_engine.request_rows([[1, 5, 6], [1, 7], [1, 9, 9, 9]], Sampling(max_new_tokens=3))
    assert [r["position"] for r in rows] == [0, 1, 2] and rows[1]["tokenized_prompt"] == [1, 7]
    assert all(r["sampling_params"]["max_tokens"] == 3 for r in rows)
    engine_rows = [  # what the engine stage hands postprocess: every input column plus its outputs
        {**rows[i], "generated_tokens": out, "generated_text": "", "num_input_tokens": 3}
        for i, out in ((2, [40, 2]), (0, [10, 11]), (1, []))
    ]
    kept = [vllm_engine.generated_ids(r) for r in engine_rows]
    assert kept[0] == {"position": 2, "generated_tokens": [40, 2]}
    assert vllm_engine.in_order(kept, 3) == [[10, 11], [], [40, 2]]
    with pytest.raises(RuntimeError, match="2 of 3"):
        vllm_engine.in_order(kept[:2], 3)
    with pytest.raises(RuntimeError, match="twice"):
        vllm_engine.in_order(kept + kept[:1], 3)


def test_vllm_lookup_does_not_import_it():
    import sys

    vllm_engine.vllm_installed()
    assert "vllm" not in sys.modules


# -- which engine ------------------------------------------------------------------------------------------------


def test_auto_takes_vllm_only_with_a_gpu_vllm_and_local_models():
    assert choose_engine("auto", 1, vllm_installed=True, models_local=True)[0] == "vllm"
    for gpus, installed, local, why in [
        (0, True, True, "gpus_per_actor is 0"),
        (1, False, True, "not installed"),
        (1, True, False, "object store"),
        (1.5, True, True, "whole number"),
    ]:
        engine, reason = choose_engine("auto", gpus, vllm_installed=installed, models_local=local)
        assert engine == "hf" and why in reason


def test_explicit_engines_are_kept_or_refused():
    assert choose_engine("hf", 1, vllm_installed=True, models_local=True)[0] == "hf"
    assert choose_engine("vllm", 1, vllm_installed=True, models_local=True)[0] == "vllm"
    with pytest.raises(RuntimeError, match="not installed"):
        choose_engine("vllm", 1, vllm_installed=False, models_local=True)
    with pytest.raises(RuntimeError, match="object store"):
        choose_engine("vllm", 1, vllm_installed=True, models_local=False)


# -- how wide ----------------------------------------------------------------------------------------------------


def test_cluster_width_is_bound_by_gpus_on_gpu_and_by_cpus_up_to_a_cap_on_cpu():
    node = {"CPU": 64.0, "GPU": 8.0}
    assert cluster_width(node, cpus_per_actor=1, gpus_per_actor=1) == 8
    assert cluster_width(node, cpus_per_actor=1, gpus_per_actor=0.5) == 16
    assert cluster_width(node, cpus_per_actor=16, gpus_per_actor=1) == 4  # the CPUs bind first
    assert cluster_width({"CPU": 2.0}, cpus_per_actor=1, gpus_per_actor=0) == 2
    assert cluster_width({"CPU": 96.0}, cpus_per_actor=1, gpus_per_actor=0) == MAX_CPU_ACTORS
    assert cluster_width({"CPU": 4.0}, cpus_per_actor=1, gpus_per_actor=1) == 1  # no GPU yet: one, to scale up for


def test_share_is_even_capped_and_never_above_the_actors():
    assert share(8, [99, 99, 99]) == [3, 3, 2]
    assert share(8, [1, 99, 99]) == [1, 4, 3]  # a run with one batch needs one actor; the others take the rest
    assert share(8, [2, 2]) == [2, 2]  # actors without a batch are not started
    assert share(2, [5, 5]) == [1, 1]


def test_nine_runs_on_eight_gpus_run_eight_side_by_side_then_the_ninth_on_all_eight():
    runs = {f"run{i}": 65 for i in range(9)}
    waves = plan_waves(runs, 8)
    assert waves == [{f"run{i}": 1 for i in range(8)}, {"run8": 8}]
    three = plan_waves({"a": 65, "b": 65, "c": 65}, 8)
    assert three == [{"a": 3, "b": 3, "c": 2}]
    for actors in range(1, 12):
        for waves in (plan_waves(runs, actors), plan_waves({"a": 2, "b": 65}, actors)):
            assert all(1 <= sum(w.values()) <= actors and min(w.values()) >= 1 for w in waves)
            assert sorted(r for w in waves for r in w) == sorted({r for w in waves for r in w})  # each run once


# -- batches and configs -----------------------------------------------------------------------------------------


def test_blocks_are_whole_batches_in_order():
    table = pa.table({"position": list(range(37))})
    blocks = batch_blocks(table, 16)
    assert [b["position"].to_pylist() for b in blocks] == [
        list(range(0, 16)),
        list(range(16, 32)),
        list(range(32, 37)),
    ]


def test_rows_are_sorted_generation_first_by_length_and_numbered():
    from gradfilter_ray.evaluation.stage import sorted_table

    rows = [
        {"kind": HELDOUT, "instruction": "a", "input": ""},
        {"kind": GENERATE, "instruction": "longer", "input": "x"},
        {"kind": GENERATE, "instruction": "mid", "input": ""},
    ]
    table = sorted_table(rows)
    assert table["instruction"].to_pylist() == ["mid", "longer", "a"]
    assert table["position"].to_pylist() == [0, 1, 2]


def test_engine_and_width_settings_are_validated():
    with pytest.raises(ConfigError, match="gpus_per_actor > 0"):
        load(None, ["evaluation.engine=vllm", "evaluation.gpus_per_actor=0"])
    with pytest.raises(ConfigError, match="num_actors"):
        load(None, ["evaluation.num_actors=0"])
    with pytest.raises(ConfigError, match="evaluation.engine"):
        load(None, ["evaluation.engine=sglang"])
    assert load(None, ["evaluation.vllm_engine_kwargs={max_num_seqs: 64}"]).evaluation.vllm_engine_kwargs == {
        "max_num_seqs": 64
    }


@pytest.mark.parametrize(
    "name, engine, gpus",
    [
        ("alpaca_llama2_7b.yaml", "auto", 1.0),
        ("alpaca_llama2_13b.yaml", "auto", 1.0),
        ("million_template.yaml", "auto", 1.0),
        ("demo.yaml", "hf", 0.0),
    ],
)
def test_shipped_configs_evaluate_as_wide_as_the_cluster(name, engine, gpus):
    ev = load(CONFIGS / name).evaluation
    assert (ev.engine, ev.gpus_per_actor, ev.num_actors) == (engine, gpus, None)


@pytest.mark.slow
@pytest.mark.ray
def test_rays_processor_builds_from_our_config_and_asks_for_our_resources(ray_cluster):
    """build_processor runs without vLLM (vLLM loads only in the engine actors): the engine stage it builds asks
    for exactly this run's pool of (cpus_per_actor, gpus_per_actor) actors on one engine process each."""
    tiny = REPO / "gradfilter_ray" / "assets" / "models" / "stories260K"
    sampling = Sampling(max_new_tokens=8, max_prompt_tokens=64)
    config = vllm_engine.processor_config(
        str(tiny), actors=2, batch_size=4, cpus_per_actor=1.5, gpus_per_actor=1.0, sampling=sampling
    )
    (engine,) = vllm_engine.processor(config).stages.values()  # no chat-template, tokenize or detokenize stage
    kwargs = engine.map_batches_kwargs
    assert (kwargs["num_cpus"], kwargs["num_gpus"]) == (1.5, 1.0)
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (2, 2)
    assert kwargs["compute"].max_tasks_in_flight_per_actor == kwargs["max_concurrency"] == 8
    assert engine.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "uni"
    assert engine.fn_constructor_kwargs["model"] == str(tiny)


def test_vllm_answers_and_hf_losses_merge_into_the_rows_the_hf_pass_writes(tmp_path):
    """The vllm engine's two phases (answers, then held-out losses from hf actors) end in the same table, and so
    the same files, as the single hf pass."""
    from gradfilter_ray.evaluation.hf_engine import with_results
    from gradfilter_ray.evaluation.stage import merge, sorted_table, write_run

    rows = [
        {"kind": GENERATE, "test_set": "vicuna", "id": "v1", "instruction": "Say hi.", "input": "", "output": ""},
        {
            "kind": HELDOUT,
            "test_set": "alpaca_eval_805",
            "id": "a1",
            "instruction": "Add",
            "input": "1, 2",
            "output": "3",
        },
        {"kind": GENERATE, "test_set": "koala", "id": "k1", "instruction": "Tell a tale.", "input": "", "output": ""},
        {"kind": HELDOUT, "test_set": "alpaca_eval_805", "id": "a2", "instruction": "Sub", "input": "", "output": "0"},
    ]
    table = sorted_table(rows)
    gen, ref = table.slice(0, 2), table.slice(2)
    scored = with_results(ref, [None, None], [2.0, 6.0], [1, 2])
    merged = merge(gen, ["hi", "once"], scored)
    one_pass = with_results(table, ["hi", "once", None, None], [float("nan")] * 2 + [2.0, 6.0], [0, 0, 1, 2])
    assert merged.schema == one_pass.schema and merged.num_rows == 4
    assert merged.drop(["loss_sum"]).equals(one_pass.drop(["loss_sum"]))
    written = write_run(open_location(str(tmp_path / "run")), merged, "0123456789abcdef")
    assert written == {"generations": 2, "heldout_loss": 8.0 / 3, "heldout_examples": 2}
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert [line.split('"answer": ')[1] for line in lines] == ['"hi"}', '"once"}']
    assert (tmp_path / "run" / "_done").read_text() == "0123456789abcdef"  # the run's key, written last

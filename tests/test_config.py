from pathlib import Path

import pytest

from gradfilter_ray.config import Config, ConfigError, describe, load, parse_override, section_hash

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").rglob("*.yaml"))


def test_every_shipped_config_loads():
    assert CONFIGS, "no configs found under jobs/configs"
    for path in CONFIGS:
        cfg = load(path)
        assert isinstance(cfg, Config), path


def test_paper_config_is_the_paper_setting():
    cfg = load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "alpaca_llama2_7b.yaml")
    assert cfg.proxy.model.name_or_path == "gpt2"
    assert cfg.ensemble.members == 5 and cfg.ensemble.epochs == 2
    assert cfg.selection.ratios == [0.05, 0.10, 0.15]
    assert cfg.finetune.model.name_or_path == "meta-llama/Llama-2-7b-hf"


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    cfg = load(None, ["ensemble.members=3", "selection.ratios=[0.2, 0.5]", "output_dir=/tmp/x", "data.path=a.jsonl"])
    assert cfg.ensemble.members == 3
    assert cfg.selection.ratios == [0.2, 0.5]
    assert cfg.output_dir == "/tmp/x"
    # an int where a float is expected is accepted and stored as float
    assert isinstance(load(None, ["ensemble.learning_rate=1"]).ensemble.learning_rate, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ensemble.memberz=3", "ensemble.memberz"),
        ("ensemble.members=three", "ensemble.members: expected an integer"),
        ("ensemble.members=0", "members must be >= 1"),
        ("ensemble.late_epoch=5", "late_epoch"),
        ("data.format=xml", "data.format: must be one of"),
        ("selection.ratios=[0.1, 1.5]", "ratios"),
        ("proxy.model.trust_remote_code=yes please", "proxy.model.trust_remote_code: expected true/false"),
        ("nosuch=1", "unknown key(s) nosuch"),
        ("data=5", "data: expected a mapping"),
    ],
)
def test_invalid_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    assert fragment in str(err.value)


def test_model_spec_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="proxy.model"):
        load(None, ["proxy.model={name_or_path: null}"])
    cfg = load(None, ["proxy.model={build_from_config: {model_type: gpt2, n_layer: 1}, tokenizer: 'bundled:gpt2'}"])
    assert cfg.proxy.model.build_from_config == {"model_type": "gpt2", "n_layer": 1}


def test_bad_yaml_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_hash_changes_with_the_section_and_only_it():
    a, b = load(None), load(None, ["ensemble.members=3"])
    assert section_hash(a.ensemble) != section_hash(b.ensemble)
    assert section_hash(a.data) == section_hash(b.data)


def test_every_field_is_documented():
    undocumented = [name for name, text in describe() if not text.strip()]
    assert not undocumented


def test_target_subsets_must_be_selected_ones():
    with pytest.raises(ConfigError, match="finetune.ratios"):
        load(None, ["selection.ratios=[0.1]", "finetune.ratios=[0.5]"])
    with pytest.raises(ConfigError, match="finetune.scorers"):
        load(None, ["scoring.scorers=[gsnr]", "finetune.scorers=[gsnr, ifd]"])

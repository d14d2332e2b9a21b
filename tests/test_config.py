"""Typed config: defaults <- YAML file <- key=value overrides; unknown keys and bad values fail readably."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from strop.config import (
    METHOD_LR,
    Config,
    all_keys,
    dump_yaml,
    from_dict,
    help_lines,
    load_config,
    parse_override,
    resolve_method_defaults,
    to_dict,
    validate,
)
from strop.errors import ConfigError, StropError
from strop.tasks import detect_task, get_task

CONFIGS = Path(__file__).parents[1] / "configs"


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# defaults, file, overrides, precedence


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.task == "auto"
    assert cfg.track == ["tensorboard"]
    assert cfg.data.train is None and cfg.data.format == "auto" and cfg.data.encoding == "utf-8"
    assert cfg.train.lr is None and cfg.train.batch_size == 32 and cfg.train.betas == [0.9, 0.999]
    assert cfg.model.path == "default" and cfg.model.pooling == "cls"
    assert cfg.eval.batch_size == 128


@pytest.mark.parametrize("method", list(METHOD_LR))
def test_an_unset_lr_takes_the_methods_measured_default(method):
    """LoRA at full fine-tuning's 5e-5 lost 16 points on held-out data (issue 24): each method has its own default,
    filled once (the note is what the run prints) and never over a value the user set."""
    cfg = load_config(None, {"peft.method": method})
    notes = resolve_method_defaults(cfg)
    assert cfg.train.lr == METHOD_LR[method]
    assert notes == [f"train.lr={METHOD_LR[method]:g} (default for peft.method={method}; set train.lr to override)"]
    assert resolve_method_defaults(cfg) == [] and cfg.train.lr == METHOD_LR[method]  # idempotent
    mine = load_config(None, {"peft.method": method, "train.lr": 2e-5})
    assert resolve_method_defaults(mine) == [] and mine.train.lr == 2e-5
    assert METHOD_LR["none"] == 5e-5 and METHOD_LR["lora"] > 5 * METHOD_LR["none"]  # PEFT needs ~10x


def test_an_unset_epochs_takes_the_tasks_default_and_says_so_where_it_is_not_the_text_one():
    text = load_config(None, {"train.lr": 5e-5})
    assert text.train.epochs is None and resolve_method_defaults(text) == []
    assert text.train.epochs == 3.0  # EPOCHS, the text tasks' default
    image = load_config(None, {"peft.method": "none", "train.lr": 1e-3})
    notes = resolve_method_defaults(image, "none", "image_classification", None, 10)
    assert image.train.epochs == 10
    assert notes == ["train.epochs=10 (default for task image_classification; set train.epochs to override)"]
    mine = load_config(None, {"train.epochs": 2})
    notes = resolve_method_defaults(mine, "none", "image_classification", None, 10)
    assert mine.train.epochs == 2 and not any("epochs" in note for note in notes)
    assert get_task("image_classification").default_epochs == 10 and get_task("single_label").default_epochs == 3


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.train.betas.append(0.5)
    a.track.append("none")
    assert b.train.betas == [0.9, 0.999]
    assert b.track == ["tensorboard"]


def test_yaml_file_sets_values(tmp_path):
    path = write_yaml(tmp_path, "name: exp\ntask: regression\ndata:\n  train: t.csv\n  validation_ratio: 0.2\n"
                                "train:\n  lr: 1.0e-4\n  epochs: 2\n  betas: [0.8, 0.9]\nmodel:\n  pooling: mean\n")
    cfg = load_config(path)
    assert cfg.name == "exp" and cfg.task == "regression"
    assert cfg.data.train == "t.csv" and cfg.data.validation_ratio == 0.2
    assert cfg.train.lr == 1e-4 and cfg.train.betas == [0.8, 0.9]
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.pooling == "mean"
    # untouched keys keep their defaults, within touched sections too
    assert cfg.train.batch_size == 32 and cfg.data.test_ratio == 0.1 and cfg.eval.batch_size == 128


def test_yaml_file_accepts_str_path_and_empty_file(tmp_path):
    assert load_config(str(write_yaml(tmp_path, ""))) == Config()
    assert load_config(write_yaml(tmp_path, "# only a comment\n", "c.yaml")) == Config()


def test_yaml_file_lr_without_dot_is_a_float(tmp_path):
    # PyYAML reads `3e-4` (no dot) as a string; the typed field still makes it a float
    cfg = load_config(write_yaml(tmp_path, "train:\n  lr: 3e-4\n"))
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=3e-4", "train.lr", 3e-4),
    ("train.lr=0.001", "train.lr", 0.001),
    ("train.epochs=2", "train.epochs", 2.0),
    ("train.epochs=0.5", "train.epochs", 0.5),
    ("train.batch_size=16", "train.batch_size", 16),
    ("train.micro_batch_size=8", "train.micro_batch_size", 8),
    ("train.micro_batch_size=", "train.micro_batch_size", None),
    ("train.restore_best=false", "train.restore_best", False),
    ("train.restore_best=False", "train.restore_best", False),
    ("model.allow_pickle=true", "model.allow_pickle", True),
    ("model.trust_remote_code=yes", "model.trust_remote_code", True),
    ("model.dropout=0.2", "model.dropout", 0.2),
    ("model.dropout=", "model.dropout", None),
    ("track=tensorboard,none", "track", ["tensorboard", "none"]),
    ("track=none", "track", ["none"]),
    ("track=[tensorboard]", "track", ["tensorboard"]),
    ("train.betas=[0.8, 0.99]", "train.betas", [0.8, 0.99]),
    ("train.betas=0.8,0.99", "train.betas", [0.8, 0.99]),
    ("data.validation=", "data.validation", None),
    ("data.validation=dev.csv", "data.validation", "dev.csv"),
    ("data.label_delimiter=|", "data.label_delimiter", "|"),
    ("name=123", "name", "123"),  # a str field takes a number as its text
    ("name=", "name", None),
    ("task=multi_label", "task", "multi_label"),
    ("data.split_seed=7", "data.split_seed", 7),
])
def test_override_values_are_parsed_as_yaml_scalars(override, key, expected):
    cfg = load_config(None, [override])
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    if isinstance(expected, float):
        assert value == pytest.approx(expected) and isinstance(value, float)
    else:
        assert value == expected and type(value) is type(expected)


def test_override_dict_form():
    cfg = load_config(None, {"train.lr": 1e-3, "data.train": "x.csv", "track": ["none"]})
    assert cfg.train.lr == 1e-3 and cfg.data.train == "x.csv" and cfg.track == ["none"]


def test_parse_override():
    assert parse_override("train.lr=0.001") == ("train.lr", 0.001)
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")  # YAML 1.1 needs a dot; the float field converts
    assert parse_override("model.allow_pickle=true") == ("model.allow_pickle", True)
    assert parse_override("train.betas=[0.8, 0.9]") == ("train.betas", [0.8, 0.9])
    assert parse_override("data.label_delimiter=|") == ("data.label_delimiter", "|")  # not a YAML block scalar
    assert parse_override("data.label_delimiter=>") == ("data.label_delimiter", ">")
    assert parse_override("data.label_delimiter=#") == ("data.label_delimiter", "#")  # not a YAML comment
    assert parse_override("name='quoted run'") == ("name", "quoted run")
    assert parse_override("name=~") == ("name", None)
    assert parse_override(" train.epochs = 2") == ("train.epochs", 2)
    assert parse_override("data.validation=") == ("data.validation", None)
    assert parse_override("name=a=b") == ("name", "a=b")  # only the first '=' separates
    assert parse_override("name=[unclosed") == ("name", "[unclosed")  # not YAML: kept as text


def test_override_without_equals_sign():
    message = config_error(None, ["train.lr"])
    assert "train.lr" in message and "key=value" in message


def test_precedence_defaults_file_overrides(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 1.0e-4\n  batch_size: 16\n  epochs: 5\n")
    cfg = load_config(path, ["train.lr=3e-4", "train.epochs=1"])
    assert cfg.train.lr == pytest.approx(3e-4)  # override beats file
    assert cfg.train.epochs == 1.0  # override beats file
    assert cfg.train.batch_size == 16  # file beats default
    assert cfg.train.seed == 42  # default stays


def test_later_override_wins():
    assert load_config(None, ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == pytest.approx(2e-3)


def test_override_can_clear_a_file_value(tmp_path):
    path = write_yaml(tmp_path, "data:\n  validation: dev.csv\n")
    assert load_config(path).data.validation == "dev.csv"
    assert load_config(path, ["data.validation="]).data.validation is None


def test_validation_runs_after_overrides(tmp_path):
    # the file alone is invalid (micro batch 12 does not divide 32); the override makes it valid
    path = write_yaml(tmp_path, "train:\n  micro_batch_size: 12\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert load_config(path, ["train.batch_size=24"]).train.micro_batch_size == 12


# ---------------------------------------------------------------------------------------------------------------
# unknown keys


@pytest.mark.parametrize("override, bad, near", [
    ("train.lrr=1", "train.lrr", "train.lr"),
    ("train.batchsize=8", "train.batchsize", "train.batch_size"),
    ("data.text_colum=body", "data.text_colum", "data.text_column"),
    ("model.max_len=64", "model.max_len", "model.max_length"),
    ("trak=none", "trak", "track"),  # top-level typo
    ("nme=x", "nme", "name"),
    ("trian.lr=1", "trian", "train.lr"),  # typo in the section name
])
def test_unknown_override_key_names_key_and_nearest(override, bad, near):
    message = config_error(None, [override])
    assert f"'{bad}'" in message
    assert f"'{near}'" in message


def test_unknown_key_in_yaml_file_names_key_and_nearest(tmp_path):
    message = config_error(write_yaml(tmp_path, "train:\n  lr: 1.0e-4\n  epoch: 2\n"))
    assert "'train.epoch'" in message and "'train.epochs'" in message


def test_unknown_top_level_key_in_yaml_file(tmp_path):
    message = config_error(write_yaml(tmp_path, "tsak: regression\n"))
    assert "'tsak'" in message and "'task'" in message


def test_unknown_key_far_from_any_key_points_to_help():
    message = config_error(None, ["zzzzqqqq=1"])
    assert "'zzzzqqqq'" in message and "--help-config" in message


def test_unknown_key_is_a_strop_error():
    with pytest.raises(StropError):
        load_config(None, ["train.lrr=1"])


# ---------------------------------------------------------------------------------------------------------------
# wrong types and choices


@pytest.mark.parametrize("override, key, value", [
    ("train.batch_size=abc", "train.batch_size", "abc"),
    ("train.batch_size=2.5", "train.batch_size", "2.5"),
    ("train.batch_size=true", "train.batch_size", "True"),  # a bool is not an int
    ("train.lr=fast", "train.lr", "fast"),
    ("train.lr=true", "train.lr", "True"),
    ("train.micro_batch_size=abc", "train.micro_batch_size", "abc"),
    ("model.allow_pickle=maybe", "model.allow_pickle", "maybe"),
    ("model.max_length=[1, 2]", "model.max_length", "[1, 2]"),
    ("name=[a, b]", "name", "['a', 'b']"),
    ("output_dir=[a]", "output_dir", "['a']"),
    ("train.betas=0.9", "train.betas", "0.9"),  # a single number is not a list
    ("train.lr={a: 1}", "train.lr", "{'a': 1}"),
])
def test_wrong_type_names_key_and_value(override, key, value):
    message = config_error(None, [override])
    assert key in message and value in message


def test_wrong_type_in_yaml_file(tmp_path):
    message = config_error(write_yaml(tmp_path, "train:\n  batch_size: '32x'\n"))
    assert "train.batch_size" in message and "32x" in message


@pytest.mark.parametrize("override, key, value, allowed", [
    ("model.pooling=max", "model.pooling", "max", ["cls", "mean"]),
    ("train.scheduler=step", "train.scheduler", "step", ["linear", "cosine", "constant"]),
    ("train.precision=fp16", "train.precision", "fp16", ["auto", "bf16", "fp32"]),
    ("train.device=tpu", "train.device", "tpu", ["auto", "cpu", "cuda"]),
    ("train.batching=sorted", "train.batching", "sorted", ["length_grouped", "random"]),
    ("data.format=xlsx", "data.format", "xlsx", ["auto", "csv", "tsv", "jsonl", "parquet", "hf",
                                                    "conll"]),
])
def test_invalid_choice_names_allowed_values(override, key, value, allowed):
    message = config_error(None, [override])
    assert key in message and repr(value) in message
    assert str(allowed) in message


def test_an_unknown_task_names_the_registered_ones():
    """task= choices come from the task registry (strop.tasks), which the config cannot import (the registry
    imports what imports the config); the registry refuses an unknown name when the run reads its data."""
    cfg = load_config(None, ["task=classification"])
    with pytest.raises(ConfigError) as info:
        detect_task(cfg)
    assert "task='classification'" in str(info.value)
    assert str(["auto", "token_classification", "image_classification", "image_multi_label", "generation",
                "single_label", "multi_label", "regression", "masked_lm"]) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# value checks


@pytest.mark.parametrize("overrides, key", [
    (["train.lr=-1e-4"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["train.epochs=0"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-8"], "train.batch_size"),
    (["model.max_length=0"], "model.max_length"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["train.log_every=0"], "train.log_every"),
    (["train.micro_batch_size=5"], "train.micro_batch_size"),  # does not divide 32
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.micro_batch_size=-4"], "train.micro_batch_size"),
    (["train.batch_size=8", "train.micro_batch_size=16"], "train.micro_batch_size"),
    (["data.validation_ratio=-0.1"], "data.validation_ratio"),
    (["data.validation_ratio=1"], "data.validation_ratio"),
    (["data.test_ratio=1.5"], "data.test_ratio"),
    (["data.validation_ratio=0.5", "data.test_ratio=0.4"], "data.validation_ratio + data.test_ratio"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.warmup=-1"], "train.warmup"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.early_stopping_patience=-1"], "train.early_stopping_patience"),
    (["train.threads=-2"], "train.threads"),
    (["model.dropout=1"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.betas=[0.9, 0.99, 0.999]"], "train.betas"),
    (["train.betas=[0.9, 1.0]"], "train.betas"),
    (["train.betas=[-0.1, 0.9]"], "train.betas"),
    (["train.betas=[0.9, abc]"], "train.betas"),
    (["train.betas=[]"], "train.betas"),
    (["data.label_delimiter=''"], "data.label_delimiter"),
    (["track=comet"], "track"),
    (["track=tensorboard,comet"], "track"),
])
def test_value_checks_name_the_key(overrides, key):
    assert key in config_error(None, overrides)


def test_negative_lr_message_names_the_value():
    assert "train.lr=-0.0001" in config_error(None, ["train.lr=-1e-4"])


def test_micro_batch_message_names_both_sizes():
    message = config_error(None, ["train.batch_size=32", "train.micro_batch_size=5"])
    assert "train.micro_batch_size=5" in message and "train.batch_size=32" in message


def test_unknown_tracker_message_names_tracker_and_choices():
    message = config_error(None, ["track=tensorboard,comet"])
    assert "'comet'" in message and "tensorboard" in message and "none" in message


@pytest.mark.parametrize("overrides", [
    ["train.micro_batch_size=8"],
    ["train.micro_batch_size=32"],
    ["data.validation_ratio=0", "data.test_ratio=0"],
    ["data.validation_ratio=0.4", "data.test_ratio=0.4"],
    ["model.dropout=0"],
    ["train.betas=[0, 0.5]"],
    ["train.max_grad_norm=0", "train.warmup=0", "train.weight_decay=0"],
    ["train.max_steps=-1"],
    ["track=none"],
])
def test_boundary_values_are_accepted(overrides):
    cfg = load_config(None, overrides)
    for override in overrides:  # accepted and held as given, not silently clamped or replaced by a default
        _assert_taken(cfg, override)


def _loaded(cfg, override: str):
    """(the value the config holds for an override's key, the value the override asked for)."""
    key, raw = override.split("=", 1)
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    asked = parse_override(override)[1]
    return node, asked


def _assert_taken(cfg, override: str) -> None:
    held, asked = _loaded(cfg, override)
    if isinstance(held, float) and not isinstance(asked, (list, dict)) and asked is not None:
        assert held == pytest.approx(float(asked)), override  # '1e-12' is text to YAML, a float to the field
    elif isinstance(held, list) and not isinstance(asked, list):
        assert held == [asked], override  # a single tracker name becomes a one-item list
    else:
        assert held == asked, override


def test_validate_checks_a_config_built_in_code():
    cfg = Config()
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# structural errors


@pytest.mark.parametrize("override", ["train=5", "data=x.csv", "model=[a]"])
def test_section_given_a_scalar(override):
    key = override.split("=")[0]
    message = config_error(None, [override])
    assert f"'{key}'" in message and "section" in message


def test_unquoted_delimiter_in_yaml_file_is_an_error_not_ignored(tmp_path):
    # `label_delimiter: |` is an empty YAML block scalar; an empty delimiter would silently turn multi-label off
    message = config_error(write_yaml(tmp_path, "data:\n  label_delimiter: |\n"))
    assert "data.label_delimiter" in message and "quote" in message
    assert load_config(write_yaml(tmp_path, "data:\n  label_delimiter: '|'\n", "q.yaml")).data.label_delimiter == "|"


def test_section_given_a_scalar_in_yaml(tmp_path):
    message = config_error(write_yaml(tmp_path, "train: 3\n"))
    assert "'train'" in message and "section" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_yaml_file_that_is_not_a_mapping(tmp_path, text, kind):
    path = write_yaml(tmp_path, text)
    message = config_error(path)
    assert str(path) in message and "mapping" in message and kind in message


def test_invalid_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: [1, 2\n  epochs: 3\n")
    message = config_error(path)
    assert str(path) in message and "not valid YAML" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "not found" in message


def test_config_path_is_a_folder(tmp_path):
    assert "not found" in config_error(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# serialisation and help


def test_dump_yaml_round_trip_of_defaults():
    cfg = load_config()
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_dump_yaml_round_trip_of_a_customised_config(tmp_path):
    cfg = load_config(None, ["name=exp", "task=multi_label", "track=none", "data.train=train.jsonl",
                             "data.label_delimiter=|", "data.validation_ratio=0.2", "train.lr=3e-4",
                             "train.epochs=1.5", "train.micro_batch_size=8", "train.betas=[0.8, 0.95]",
                             "model.dropout=0.3", "model.pooling=mean", "train.restore_best=false"])
    text = dump_yaml(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # the dumped file also loads as a config file, as a run folder's config.yaml is re-read
    assert load_config(write_yaml(tmp_path, text)) == cfg


def test_dump_yaml_is_plain_yaml_with_every_section():
    mapping = yaml.safe_load(dump_yaml(Config()))
    assert set(mapping) == {f.name for f in dataclasses.fields(Config)}
    assert mapping["train"]["lr"] is None  # the method's default, filled by the run (resolve_method_defaults)


def test_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="train.lrr"):
        from_dict({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="train.lr"):
        from_dict({"train": {"lr": -1}})


def test_all_keys_are_dotted_and_unique():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    for key in ("name", "task", "track", "data.train", "data.split_seed", "model.path", "train.lr", "eval.batch_size"):
        assert key in keys
    assert "train" not in keys and "data" not in keys  # sections are not keys


def test_help_lines_cover_every_key_with_a_doc():
    rows = help_lines()
    assert [key for key, _, _ in rows] == all_keys()
    for key, default, text in rows:
        assert text.strip(), f"{key} has no doc"
    by_key = {key: (default, text) for key, default, text in rows}
    assert by_key["train.lr"][0] == "" and "lora 5e-4" in by_key["train.lr"][1]  # empty: by method
    assert by_key["data.train"][0] == ""  # None shows as empty
    assert "[cls|mean]" in by_key["model.pooling"][1]  # choices are listed


def test_every_field_has_a_one_line_doc():
    def fields(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from fields(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f.metadata.get("doc")

    docs = dict(fields(Config()))
    assert set(docs) == set(all_keys())
    for key, text in docs.items():
        assert text and text.strip() and "\n" not in text, f"{key} needs a one-line doc"


# ---------------------------------------------------------------------------------------------------------------
# shipped configs


SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_configs_folder_has_yaml_files():
    assert SHIPPED, f"no YAML files in {CONFIGS}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    validate(cfg)
    # every key in the file is applied, none ignored
    mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for section, values in mapping.items():
        if isinstance(values, dict):
            for name, value in values.items():
                got = getattr(getattr(cfg, section), name)
                assert got == value or str(got) == str(value) or got == pytest.approx(float(value)), \
                    f"{path.name}: {section}.{name}"
        else:
            assert getattr(cfg, section) == values
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_data_files_exist(path):
    cfg = load_config(path)
    root = CONFIGS.parent
    for key in ("train", "validation", "test"):
        value = getattr(cfg.data, key)
        if value and "shared/datasets" in value and not (root / value).exists():
            pytest.skip(f"benchmark data {value} is not on this machine (fresh clones have no ../shared)")
        if value:
            assert (root / value).exists(), f"{path.name}: data.{key}={value} does not exist relative to the repo"

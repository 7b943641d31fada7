"""Specification of ddpm.config: YAML -> dataclasses, overrides, validation, atomic saving."""

import dataclasses
import inspect
import os

import pytest
import yaml

from ddpm.config import (
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
    validate,
)


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and round trip --------------------------------------------------------------


def test_default_config_is_valid():
    validate(Config())


def test_every_field_is_documented_by_a_comment():
    for section, cls in SECTIONS.items():
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            i = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
            assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{section}.{f.name}"


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    cfg = Config()
    cfg.data.z_range = [10, 50]
    cfg.data.manifest = "subjects.csv"
    cfg.optim.lr = 3e-5
    cfg.model.use_prior = True
    cfg.diffusion.schedule = "linear"
    cfg.train.max_steps = 123
    cfg.loss.min_snr_gamma = 5.0
    save_config(cfg, tmp_path / "cfg.yaml")
    assert load_config(tmp_path / "cfg.yaml") == cfg


def test_config_to_dict_gives_plain_lists_not_tuples():
    cfg = Config()
    cfg.data.z_range = (10, 50)
    d = config_to_dict(cfg)
    assert d["data"]["z_range"] == [10, 50] and type(d["data"]["z_range"]) is list
    assert set(d) == set(SECTIONS)
    yaml.safe_dump(d)  # only builtin types: safe_dump would refuse anything else


def test_missing_keys_keep_their_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 0.001\n"))
    expected = Config()
    expected.optim.lr = 0.001
    assert cfg == expected


def test_empty_file_gives_the_default_config(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_exponent_without_a_dot_reads_as_a_float(tmp_path):
    # Plain PyYAML (YAML 1.1) would load "3e-4" as a string.
    assert load_config(write(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "optim: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        load_config(path)


# --- unknown names --------------------------------------------------------------------------


def test_unknown_key_names_key_file_and_nearest_valid_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr_rate: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown key 'optim.lr_rate'; did you mean 'optim.lr'?"


def test_key_in_the_wrong_section_suggests_the_right_section():
    with pytest.raises(ConfigError, match="unknown key 'optim.batch_size'.*'train.batch_size'"):
        config_from_dict({"optim": {"batch_size": 8}})


def test_unknown_section_names_section_file_and_nearest_valid_section(tmp_path):
    path = write(tmp_path, "optm:\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown section 'optm'; did you mean 'optim'?"


def test_key_written_at_top_level_suggests_its_section():
    with pytest.raises(ConfigError, match="unknown section 'lr'; did you mean 'optim.lr'"):
        config_from_dict({"lr": 0.001}, source="cfg.yaml")


def test_section_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ConfigError, match="cfg.yaml: section 'optim' must be a mapping"):
        config_from_dict({"optim": [0.001]}, source="cfg.yaml")


def test_dose_keys_load_into_the_dose_section(tmp_path):
    path = write(tmp_path, "dose:\n  patch_size: 16\n  spacing_mm: [2, 2, 3]\n"
                           "  source: manifest\n  manifest: patients.csv\n")
    cfg = load_config(path)
    assert cfg.dose.patch_size == 16 and cfg.dose.source == "manifest"
    assert cfg.dose.spacing_mm == [2.0, 2.0, 3.0] and type(cfg.dose.spacing_mm[0]) is float
    assert cfg.data == Config().data  # the slice data section is untouched


def test_unknown_dose_key_names_key_file_and_nearest_valid_key(tmp_path):
    path = write(tmp_path, "dose:\n  n_patient: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    expected = f"{path}: unknown key 'dose.n_patient'; did you mean 'dose.n_patients'?"
    assert str(err.value) == expected


def test_num_classes_is_derived_not_a_key():
    with pytest.raises(ConfigError, match="unknown key 'model.num_classes'"):
        config_from_dict({"model": {"num_classes": 20}})


# --- types ----------------------------------------------------------------------------------


def test_string_for_float_is_rejected_with_key_file_and_value(tmp_path):
    path = write(tmp_path, "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: expected float for 'optim.lr', got 'fast' (str)"


@pytest.mark.parametrize("value", [1, 0, "true"])
def test_int_or_string_for_bool_is_rejected(value):
    with pytest.raises(ConfigError, match="expected bool for 'model.use_prior'"):
        config_from_dict({"model": {"use_prior": value}})


@pytest.mark.parametrize("key", ["n_bins", "split_seed"])
def test_bool_for_int_is_rejected(key):
    with pytest.raises(ConfigError, match=f"expected int for 'data.{key}', got True"):
        config_from_dict({"data": {key: True}})


def test_float_for_int_is_rejected():
    with pytest.raises(ConfigError, match="expected int for 'data.n_bins', got 2.5"):
        config_from_dict({"data": {"n_bins": 2.5}})


def test_list_with_a_wrong_element_type_is_rejected_naming_the_element():
    with pytest.raises(ConfigError, match=r"expected list\[int\] for 'data.z_range'.*element 1"):
        config_from_dict({"data": {"z_range": [8, "top"]}})


def test_scalar_for_list_is_rejected():
    with pytest.raises(ConfigError, match=r"expected list\[float\] for 'optim.betas'"):
        config_from_dict({"optim": {"betas": 0.9}})


def test_int_is_accepted_for_float_and_stored_as_float():
    cfg = config_from_dict({"optim": {"lr": 1, "betas": [0, 1 - 1e-3]}})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert type(cfg.optim.betas[0]) is float


def test_null_is_accepted_only_where_the_field_is_optional():
    assert config_from_dict({"train": {"max_steps": None}}).train.max_steps is None
    with pytest.raises(ConfigError, match="expected int for 'train.epochs', got None"):
        config_from_dict({"train": {"epochs": None}})


def test_literal_choice_outside_the_choices_is_rejected_listing_them():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"diffusion": {"schedule": "cosin"}}, source="cfg.yaml")
    message = str(err.value)
    assert "cfg.yaml: expected one of 'linear', 'cosine', 'sigmoid'" in message
    assert "'diffusion.schedule'" in message and "did you mean 'cosine'?" in message


def test_literal_of_ints_rejects_the_same_number_as_a_float():
    with pytest.raises(ConfigError, match="expected one of 2, 3 for 'model.dims'"):
        config_from_dict({"model": {"dims": 2.0}})


def test_validate_catches_a_wrong_type_set_in_code():
    cfg = Config()
    cfg.train.precision = "fp8"
    with pytest.raises(ConfigError, match="train.precision"):
        validate(cfg, "edited")


# --- overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim.lr=3e-4", ("optim", "lr", 3e-4)),
        ("train.epochs=7", ("train", "epochs", 7)),
        ("data.z_range=[10,50]", ("data", "z_range", [10, 50])),
        ("model.use_prior=true", ("model", "use_prior", True)),
        ("train.max_steps=null", ("train", "max_steps", None)),
        ("train.max_steps=", ("train", "max_steps", None)),
        ("train.device=cuda:1", ("train", "device", "cuda:1")),
    ],
)
def test_parse_override_reads_the_value_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["optim.lr", "lr=0.1", "optim.lr.x=1", ".lr=1", "optim.=1"])
def test_malformed_override_is_rejected(text):
    with pytest.raises(ConfigError, match=f"--set {text}: expected section.key=value"):
        parse_override(text)


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=3e-4", "data.z_range=[10,50]", "model.use_prior=true",
                             "train.max_steps=20", "train.max_steps=null"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.z_range == [10, 50]
    assert cfg.model.use_prior is True
    assert cfg.train.max_steps is None  # later overrides win
    assert cfg.train.epochs == 3  # untouched keys keep the file's value


def test_override_of_the_wrong_type_is_named_as_coming_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, ""), ["optim.lr=abc"])
    assert str(err.value).startswith("--set optim.lr=abc: expected float for 'optim.lr'")


def test_override_of_an_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="--set optim.lr_rate=1: unknown key 'optim.lr_rate'; "
                                          "did you mean 'optim.lr'"):
        load_config(write(tmp_path, ""), ["optim.lr_rate=1"])


def test_override_of_a_text_field_keeps_the_text_typed():
    cfg = apply_overrides(Config(), ["train.name=2024", "train.early_stop_metric=no"])
    assert cfg.train.name == "2024" and cfg.train.early_stop_metric == "no"


def test_override_breaking_consistency_is_rejected_naming_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set data.z_range=\[50,10\]: data.z_range"):
        load_config(write(tmp_path, ""), ["data.z_range=[50,10]"])


def test_override_can_repair_an_inconsistent_file(tmp_path):
    path = write(tmp_path, "sample:\n  guidance: 2.0\n")
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        load_config(path)
    assert load_config(path, ["diffusion.cond_drop_prob=0.1"]).sample.guidance == 2.0


def test_apply_overrides_leaves_the_original_untouched():
    cfg = Config()
    new = apply_overrides(cfg, ["optim.lr=0.5"])
    assert new.optim.lr == 0.5 and cfg.optim.lr == Config().optim.lr


# --- consistency between fields ----------------------------------------------------------


@pytest.mark.parametrize(
    "d, message",
    [
        ({"data": {"z_range": [40, 20]}}, "data.z_range must be .low, high. with low <= high"),
        ({"data": {"z_range": [8, 12], "n_bins": 10}}, "holds 5 slices, fewer than data.n_bins"),
        ({"data": {"z_range": [8, 70]}}, "reaches past the phantom volume"),
        ({"data": {"n_bins": 0}}, r"data.n_bins must be in \[1, inf\), got 0"),
        ({"data": {"split_fractions": [0.7, 0.2, 0.2]}}, "summing to 1"),
        ({"data": {"split_fractions": [1.0, 0.0, 0.0]}}, "data.split_fractions must be in"),
        ({"data": {"clip_percentiles": [99.0, 1.0]}}, "low < high"),
        ({"data": {"source": "manifest"}}, "needs data.manifest"),
        ({"data": {"image_size": 30}}, "divisible by 4"),
        ({"model": {"attention_levels": [3]}}, "level 3"),
        ({"model": {"num_heads": 3}}, "does not divide"),
        ({"model": {"dims": 3, "use_prior": True}}, "use_prior needs model.dims == 2"),
        ({"diffusion": {"zero_terminal_snr": True}}, "prediction 'v' or 'x0'"),
        ({"loss": {"channel_weights": [1.0]}}, "model.out_channels=2"),
        ({"ema": {"decay": 1.0}}, r"ema.decay must be in \[0, 1\)"),
        ({"eval": {"timesteps": [50, 1000]}}, r"eval.timesteps \[1000\] lie outside"),
        ({"sample": {"steps": 2000}}, "exceeds diffusion.timesteps"),
        ({"sample": {"guidance": 1.5}}, "cond_drop_prob > 0"),
        ({"sample": {"guidance": 1.5}, "diffusion": {"cond_drop_prob": 0.1},
          "model": {"conditioning": "none"}}, "needs a conditional model"),
        ({"train": {"device": "gpu"}}, "train.device must be"),
        ({"optim": {"lr": 0.0}}, r"optim.lr must be in \(0, inf\)"),
        ({"dose": {"source": "manifest"}}, "needs dose.manifest"),
        ({"dose": {"ct_window": [500.0, -500.0]}}, "dose.ct_window must be .low, high."),
        ({"dose": {"spacing_mm": [2.0, 2.0]}}, "dose.spacing_mm must be three sizes"),
        ({"dose": {"spacing_mm": [2.0, 0.0, 3.0]}}, r"dose.spacing_mm must be in \(0, inf\)"),
        ({"dose": {"split_fractions": [0.5, 0.3, 0.3]}}, "dose.split_fractions must be three"),
        ({"dose": {"ptv_fraction": 1.5}}, r"dose.ptv_fraction must be in \[0, 1\]"),
        ({"dose": {"patch_size": 0}}, r"dose.patch_size must be in \[1, inf\)"),
    ],
)
def test_inconsistent_values_are_rejected_naming_the_source(d, message):
    with pytest.raises(ConfigError, match=f"^cfg.yaml: .*{message}"):
        config_from_dict(d, source="cfg.yaml")


def test_consistent_non_default_values_are_accepted():
    cfg = config_from_dict({
        "data": {"z_range": [0, 9], "n_bins": 10, "split_fractions": [0.5, 0.25, 0.25]},
        "diffusion": {"zero_terminal_snr": True, "prediction": "v", "cond_drop_prob": 0.1},
        "sample": {"guidance": 2.0, "steps": 1000},
        "eval": {"timesteps": [0, 999]},
    })
    assert cfg.data.n_bins == 10


# --- derived values ----------------------------------------------------------------------


def test_num_classes_is_two_per_z_bin_for_token_conditioning():
    cfg = config_from_dict({"data": {"n_bins": 7}})
    assert cfg.num_classes == 14
    cfg.data.n_bins = 30  # derived, so it follows the bins
    assert cfg.num_classes == 60


@pytest.mark.parametrize("conditioning, expected", [("position", 2), ("none", 0)])
def test_num_classes_for_other_conditionings(conditioning, expected):
    assert config_from_dict({"model": {"conditioning": conditioning}}).num_classes == expected


def test_input_channels_add_the_prior_channel():
    assert Config().input_channels == 2
    assert config_from_dict({"model": {"use_prior": True}}).input_channels == 3


# --- atomic saving -------------------------------------------------------------------------


def test_save_config_leaves_no_temp_file(tmp_path):
    save_config(Config(), tmp_path / "cfg.yaml")
    assert os.listdir(tmp_path) == ["cfg.yaml"]


def test_save_config_creates_missing_folders(tmp_path):
    save_config(Config(), tmp_path / "runs" / "a" / "cfg.yaml")
    assert load_config(tmp_path / "runs" / "a" / "cfg.yaml") == Config()


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    save_config(Config(), path)
    before = path.read_text()
    changed = Config()
    changed.optim.lr = 0.5

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_config(changed, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["cfg.yaml"]  # the temp file was cleaned up


def test_unserialisable_config_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "cfg.yaml"
    save_config(Config(), path)
    before = path.read_text()
    broken = Config()
    broken.train.name = object()
    with pytest.raises(yaml.YAMLError):
        save_config(broken, path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["cfg.yaml"]

import pytest

from biflow.config import ConfigError, ExperimentConfig, FlowConfig, ReverseConfig, load_config, save_config


pytestmark = pytest.mark.unit


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigError, match=r"unknown key 'reverse.perceptual.netwrk'; "
                                          r"did you mean 'reverse.perceptual.network'\? allowed keys here: .*network"):
        load_config({"reverse": {"perceptual": {"netwrk": "vgg"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'; allowed keys here"):  # nothing close
        load_config(None, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config({"trian": {"steps": 3}})


def test_wrong_type_and_literal_name_allowed_values():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        load_config({"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"train.engine: 'horovod' is not allowed; allowed values: 'deepspeed', 'ddp'"):
        load_config({"train": {"engine": "horovod"}})
    with pytest.raises(ConfigError, match=r"train.zero_stage=4: allowed values are 0, 1, 2, 3"):
        load_config({"train": {"zero_stage": 4}})


def test_geometry_is_checked():
    with pytest.raises(ConfigError, match=r"flow.patch_size=5 does not divide flow.image_size=28"):
        load_config({"flow": {"patch_size": 5}})
    with pytest.raises(ConfigError, match=r"flow.width must be > 0, got -8"):
        load_config({"flow": {"width": -8}})


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "optim.betas=[0.9, 0.99]", "flow.noise_std=0.05", "stage=reverse"])
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.9, 0.99) and cfg.flow.noise_std == 0.05
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])


def test_size_registry_explicit_fields_win():
    cfg = load_config({"flow": {"size": "B/2", "image_size": 32, "channels": 4, "num_blocks": 4}})
    assert (cfg.flow.width, cfg.flow.patch_size, cfg.flow.num_blocks, cfg.flow.num_heads) == (768, 2, 4, 12)
    assert FlowConfig.from_size("XL/2").width == 1152
    assert ReverseConfig.from_size("B/2").depth == 12
    with pytest.raises(ConfigError, match=r"flow.size='H/2': unknown size; allowed: S/<patch>, B/<patch>"):
        load_config({"flow": {"size": "H/2"}})


def test_defaults_validate():
    assert isinstance(load_config(None), ExperimentConfig)


def test_numbers_as_people_write_them(tmp_path):
    """Scientific notation is a string to PyYAML (YAML 1.1 wants a dot: `2e-3`, `1e-4`); the
    config takes it as a number, in files and in --set, and still refuses words."""
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 2e-3\n  weight_decay: 1E-2\ntrain:\n  steps: 1e3\n  log_every: 1_000\n")
    cfg = load_config(path, ["flow.noise_std=.5"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps, cfg.train.log_every) == (2e-3, 1e-2, 1000, 1000)
    assert cfg.flow.noise_std == 0.5 and isinstance(cfg.train.steps, int)
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, ["train.steps=2.5e2"]).train.steps == 250
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got '1.5e0'"):
        load_config(None, ["train.steps=1.5e0"])
    for word in ("nan", "inf", "1e", "1e-4x"):
        with pytest.raises(ConfigError, match=rf"optim.lr: expected a number, got '{word}'"):
            load_config(None, [f"optim.lr={word}"])

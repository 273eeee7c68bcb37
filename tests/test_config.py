"""Config composition and validation: every shipped option composes into the schema,
keys the schema does not declare are refused, and every refused value names its
key and the fix in one line."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gemini.checkpoint.disk import uses_storage
from gemini.cli import CONF
from gemini.config import (
    ConfigError,
    GeminiConfig,
    config_hash,
    flatten,
    register_configs,
    to_schema,
    validate,
)


def _primary_groups() -> set[str]:
    """Groups chosen in config.yaml's defaults list; any other group is added with ``+``."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {next(iter(d)) for d in defaults if isinstance(d, dict)}


GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(p for p in CONF.iterdir() if p.is_dir())
    for option in sorted(group.glob("*.yaml"))
]


# -- composition -------------------------------------------------------------


def test_every_schema_group_ships_options() -> None:
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"model", "cluster", "backend", "failure", "train", "tracking"} <= groups
    assert {"model", "cluster", "backend", "failure", "train", "tracking"} <= _primary_groups()


def test_default_config_composes_with_hydra_node_and_validates(
    compose_cfg: Callable[..., DictConfig], outputs_dir: Path
) -> None:
    cfg = compose_cfg()
    assert "hydra" in cfg  # composed as the console script sees it
    typed = to_schema(cfg)
    assert isinstance(typed, GeminiConfig)
    assert typed.model.name == "gpt_tiny"
    assert typed.backend.name == "none"
    assert typed.paths.outputs == str(outputs_dir)


def test_outputs_default_to_gemini_outputs_as_an_absolute_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hydra_compose: Callable[[list[str] | None], DictConfig],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMINI_OUTPUTS", "relative/out")
    typed = to_schema(hydra_compose(None))
    assert typed.paths.outputs == str(tmp_path / "relative" / "out")
    assert os.path.isabs(typed.paths.outputs)


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_every_option_of_every_group_composes_and_validates(
    compose_cfg: Callable[..., DictConfig], group: str, option: str
) -> None:
    prefix = "" if group in _primary_groups() else "+"
    # A failure is composed with the backend and network that can inject every kind;
    # an ablation column names its backend itself (the tests' default is none).
    extra = {
        "failure": ["backend=replicated", "cluster.network=netns"],
        "ablation": ["backend=replicated"],
    }.get(group, [])
    cfg = compose_cfg(f"{prefix}{group}={option}", *extra)
    assert cfg.hydra.runtime.choices[group] == option
    typed = to_schema(cfg)
    if group in ("model", "backend", "failure"):
        # An option of these groups names itself: MLflow tags and reports read it.
        assert getattr(typed, group).name == option


def test_schema_round_trips_through_a_plain_dict(compose_cfg: Callable[..., DictConfig]) -> None:
    typed = to_schema(compose_cfg("model=mlp", "train.parallel=zero", "cluster.nodes=2"))
    plain = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(typed)))
    assert isinstance(plain, DictConfig)
    assert to_schema(plain) == typed


def test_flattened_params_use_dotted_config_keys() -> None:
    params = flatten(OmegaConf.to_container(OmegaConf.structured(GeminiConfig())))  # type: ignore[arg-type]
    assert params["cluster.nodes"] == 4
    assert params["backend.replication.factor"] == 2
    assert "cluster" not in params


def test_config_hash_follows_what_shapes_a_checkpoint() -> None:
    a, b = GeminiConfig(), GeminiConfig()
    b.train.steps = 7  # the length of training does not change a checkpoint's layout
    assert config_hash(a) == config_hash(b)
    b.train.seed = 1
    assert config_hash(a) != config_hash(b)


# -- unknown keys ------------------------------------------------------------


@pytest.mark.parametrize("override", ["model.nope=1", "foo.bar=1", "cluster.node=2"])
def test_overriding_a_key_the_schema_lacks_is_refused_at_composition(
    compose_cfg: Callable[..., DictConfig], override: str
) -> None:
    with pytest.raises(HydraException, match=re.escape(override.split("=")[0])):
        compose_cfg(override)


@pytest.mark.parametrize(("override", "key"), [("+model.nope=1", "nope"), ("+foo=1", "foo")])
def test_adding_a_key_the_schema_lacks_is_refused_by_the_schema(
    compose_cfg: Callable[..., DictConfig], override: str, key: str
) -> None:
    with pytest.raises(OmegaConfBaseException, match=key):
        to_schema(compose_cfg(override))


def test_a_plain_config_with_an_unknown_key_is_refused() -> None:
    plain = OmegaConf.to_container(OmegaConf.structured(GeminiConfig()))
    assert isinstance(plain, dict)
    plain["train"]["stepz"] = 3
    with pytest.raises(OmegaConfBaseException, match="stepz"):
        to_schema(OmegaConf.create(plain))


def test_an_option_file_with_a_misspelt_key_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "typo.yaml").write_text(
        "defaults:\n  - base_model\nname: typo\nkind: gpt\nn_layers: 2\n"
    )
    register_configs()
    GlobalHydra.instance().clear()
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises((HydraException, OmegaConfBaseException), match="n_layers"),
    ):
        compose("config", overrides=["model=typo"])


def test_a_value_of_the_wrong_type_is_refused(compose_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises((HydraException, OmegaConfBaseException), match=r"cluster\.nodes"):
        compose_cfg("cluster.nodes=abc")


# -- values a type cannot check ----------------------------------------------


def _over_capacity(c: GeminiConfig) -> None:
    c.cluster.nodes = c.cluster.max_ranks_per_core * (os.cpu_count() or 1) + 1


def _replicated(**replication: object) -> Callable[[GeminiConfig], None]:
    def apply(c: GeminiConfig) -> None:
        c.backend.name = "replicated"
        for k, v in replication.items():
            setattr(c.backend.replication, k, v)

    return apply


def _set(path: str, value: object) -> Callable[[GeminiConfig], None]:
    def apply(c: GeminiConfig) -> None:
        *parents, leaf = path.split(".")
        node: object = c
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)

    return apply


def _follow_up(then: str, **failure: object) -> Callable[[GeminiConfig], None]:
    """A valid first failure on a memory backend, then ``then`` (and ``failure`` changes)."""

    def apply(c: GeminiConfig) -> None:
        c.backend.name = "memory"
        c.failure.name = "hardware_once"
        c.failure.then = then
        for k, v in failure.items():
            setattr(c.failure, k, v)

    return apply


def _hang_unwatched(c: GeminiConfig) -> None:
    c.failure.name = "hang_once"
    c.cluster.hang_timeout_s = 0.0


def _persist_in_seconds_and_steps(c: GeminiConfig) -> None:
    c.backend.name = "replicated"
    c.backend.persist_every_s = 5.0
    c.backend.persist_every_n = 4


def _kill_during_a_disk_snapshot(c: GeminiConfig) -> None:
    _follow_up("kill_during_snapshot")(c)
    c.backend.name = "disk"


REFUSALS: list[tuple[str, str, Callable[[GeminiConfig], None]]] = [
    ("no nodes", "cluster.nodes", _set("cluster.nodes", 0)),
    ("more ranks than the host holds", "cluster.nodes", _over_capacity),
    ("no ranks per node", "cluster.ranks_per_node", _set("cluster.ranks_per_node", 0)),
    ("no threads", "cluster.threads_per_rank", _set("cluster.threads_per_rank", 0)),
    ("zero heartbeat", "cluster.heartbeat_s", _set("cluster.heartbeat_s", 0.0)),
    ("no missed beats", "cluster.missed_beats", _set("cluster.missed_beats", 0)),
    (
        "no collective timeout",
        "cluster.collective_timeout_s",
        _set("cluster.collective_timeout_s", 0.0),
    ),
    (
        "hang watchdog within one beat",
        "cluster.hang_timeout_s",
        _set("cluster.hang_timeout_s", 0.25),
    ),
    ("hang watchdog off for a hang", "failure.name", _hang_unwatched),
    ("unknown device", "cluster.device", _set("cluster.device", "tpu")),
    ("unknown launcher", "cluster.launcher", _set("cluster.launcher", "carrier-pigeon")),
    ("unknown parallelism", "train.parallel", _set("train.parallel", "pipeline")),
    ("unknown optimizer kernel", "train.optimizer_impl", _set("train.optimizer_impl", "apex")),
    ("no steps", "train.steps", _set("train.steps", 0)),
    ("empty batch", "train.micro_batch", _set("train.micro_batch", 0)),
    ("zero learning rate", "train.lr", _set("train.lr", 0.0)),
    ("heads not dividing the width", "model.n_head", _set("model.n_head", 3)),
    ("sequence longer than the block", "train.seq_len", _set("train.seq_len", 257)),
    ("unknown model kind", "model.kind", _set("model.kind", "cnn")),
    ("unknown backend", "backend.name", _set("backend.name", "tape")),
    ("checkpoint every 0 steps", "backend.every_n", _set("backend.every_n", 0)),
    ("negative bandwidth", "backend.bandwidth_gbps", _set("backend.bandwidth_gbps", -1.0)),
    ("negative persist period", "backend.persist_every_n", _set("backend.persist_every_n", -1)),
    ("persist period twice", "backend.persist_every_n", _persist_in_seconds_and_steps),
    ("more replicas than nodes", "backend.replication.factor", _replicated(factor=5)),
    ("unknown placement", "backend.replication.placement", _replicated(placement="star")),
    ("unknown follow-up failure", "failure.then", _follow_up("meteor")),
    ("follow-up of no failure", "failure.then", _follow_up("hardware", name="none")),
    ("follow-up of random arrivals", "failure.then", _follow_up("software", name="poisson")),
    ("follow-up at once", "failure.then_after_steps", _follow_up("software", then_after_steps=0)),
    ("follow-up off the cluster", "failure.then_node", _follow_up("hardware", then_node=9)),
    ("follow-up kill without snapshots", "failure.then", _kill_during_a_disk_snapshot),
]


@pytest.mark.parametrize(("key", "mutate"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused_value_raises_config_error_naming_key_and_fix(
    key: str, mutate: Callable[[GeminiConfig], None]
) -> None:
    cfg = GeminiConfig()
    cfg.model.name = "gpt_tiny"
    validate(cfg)  # the defaults are valid: the mutation alone is refused
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    assert err.key == key
    assert str(err).startswith(f"{key}=")
    assert err.fix.strip(), "the error must say what to do"
    assert "\n" not in str(err), "one line, for the console"


def test_capacity_refusal_names_both_knobs_and_the_limit() -> None:
    cfg = GeminiConfig()
    _over_capacity(cfg)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "cluster.ranks_per_node" in msg
    assert "cluster.max_ranks_per_core" in msg


def test_gpt_checks_do_not_apply_to_the_mlp() -> None:
    cfg = GeminiConfig()
    cfg.model.kind = "mlp"
    cfg.model.n_head = 3
    cfg.train.seq_len = 10_000
    validate(cfg)


def test_to_schema_validates_a_composed_config(compose_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"^model\.n_head=3: "):
        to_schema(compose_cfg("model.n_head=3"))


@pytest.mark.parametrize("name", ["memory", "replicated"])
def test_a_persistent_tier_in_steps_writes_to_storage(name: str) -> None:
    cfg = GeminiConfig()
    cfg.model.name = "gpt_tiny"
    cfg.backend.name = name
    assert not uses_storage(cfg)
    cfg.backend.persist_every_n = 4
    validate(cfg)
    assert uses_storage(cfg)

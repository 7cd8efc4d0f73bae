"""Server settings: defaults < YAML < environment < flags, and errors that name their source."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pllava_decoder import server as decoder_server
from pllava_decoder.settings import ENV_PREFIX as DECODER_ENV, DecoderSettings
from pllava_encoder import server as encoder_server
from pllava_encoder.server import build_parser, main
from pllava_encoder.settings import ENV_PREFIX, EncoderSettings
from pllava_openai import server as openai_server
from pllava_openai.settings import ENV_PREFIX as OPENAI_ENV, OpenAISettings
from pllava_serving.settings import SPARE_RPCS, concurrent_rpc_limit, given_flags, load_settings


#: each server's settings, the prefix of its environment variables and its command line
SERVERS = {"encoder": (EncoderSettings, ENV_PREFIX, encoder_server.build_parser),
           "decoder": (DecoderSettings, DECODER_ENV, decoder_server.build_parser),
           "openai": (OpenAISettings, OPENAI_ENV, openai_server.build_parser)}


@dataclass(frozen=True)
class Demo:
    name: str = "demo"
    count: int = 1
    ratio: float = 0.5
    verbose: bool = False
    limit: int | None = None
    shape: tuple[int, int, int] = (1, 2, 3)
    tags: tuple[str, ...] = ()


def write(tmp_path, text: str):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given():
    assert load_settings(Demo, env_prefix="DEMO_", environ={}) == Demo()


def test_yaml_then_env_then_flags_take_precedence(tmp_path):
    yaml_path = write(tmp_path, "model: /from/yaml\nport: 1001\nmax_queue: 7\ndevice_id: 3\n")
    env = {"PLLAVA_ENCODER_PORT": "1002", "PLLAVA_ENCODER_MAX_QUEUE": "8"}
    flags = {"port": 1003, "max_queue": None}  # None = flag not given

    s = load_settings(EncoderSettings, yaml_path=yaml_path, env_prefix=ENV_PREFIX, environ=env, overrides=flags)
    assert s.port == 1003          # flag beats env and YAML
    assert s.max_queue == 8        # env beats YAML (the flag was not given)
    assert s.device_id == 3        # YAML beats the default
    assert s.model == "/from/yaml"
    assert s.host == "127.0.0.1"   # default

    s = load_settings(EncoderSettings, yaml_path=yaml_path, env_prefix=ENV_PREFIX, environ=env)
    assert (s.port, s.max_queue) == (1002, 8)
    s = load_settings(EncoderSettings, yaml_path=yaml_path, env_prefix=ENV_PREFIX, environ={})
    assert (s.port, s.max_queue) == (1001, 7)


def test_parsed_flags_override_through_the_real_parser(tmp_path):
    yaml_path = write(tmp_path, "model: m\nport: 1001\nlog_level: DEBUG\n")
    args = build_parser().parse_args(["--config", str(yaml_path), "--port", "0", "--max-frames-per-batch", "9"])
    s = load_settings(EncoderSettings, yaml_path=args.config, env_prefix=ENV_PREFIX, environ={},
                      overrides=given_flags(args, EncoderSettings))
    assert (s.port, s.max_frames_per_batch, s.log_level, s.video_workers) == (0, 9, "DEBUG", 2)


def test_environment_strings_are_parsed_to_the_field_types():
    env = {"DEMO_NAME": "x y", "DEMO_COUNT": "42", "DEMO_RATIO": "1e-3", "DEMO_VERBOSE": "yes",
           "DEMO_LIMIT": "none", "DEMO_SHAPE": "4, 5,6", "DEMO_TAGS": "[a,b]"}
    s = load_settings(Demo, env_prefix="DEMO_", environ=env)
    assert s == Demo(name="x y", count=42, ratio=1e-3, verbose=True, limit=None, shape=(4, 5, 6), tags=("a", "b"))
    assert load_settings(Demo, env_prefix="DEMO_", environ={"DEMO_LIMIT": "7", "DEMO_VERBOSE": "off"}) \
        == Demo(limit=7, verbose=False)


def test_an_empty_variable_of_an_optional_setting_counts_as_unset(tmp_path):
    """Compose passes ``${UNSET}`` as an empty variable: it must not turn off the token file or
    the TLS the YAML asks for (``none`` still does)."""
    yaml_path = write(tmp_path, "model: m\nauth_token_file: /run/secrets/tokens\n")
    for empty in ("", "  "):
        s = load_settings(EncoderSettings, yaml_path=yaml_path, env_prefix=ENV_PREFIX,
                          environ={"PLLAVA_ENCODER_AUTH_TOKEN_FILE": empty})
        assert s.auth_token_file == "/run/secrets/tokens"
    s = load_settings(EncoderSettings, yaml_path=yaml_path, env_prefix=ENV_PREFIX,
                      environ={"PLLAVA_ENCODER_AUTH_TOKEN_FILE": "none"})
    assert s.auth_token_file is None
    assert load_settings(Demo, env_prefix="DEMO_", environ={"DEMO_LIMIT": ""}) == Demo()


def test_kubernetes_service_variables_are_not_settings():
    """A Service named like a server's prefix (pllava-decoder) gives every pod such variables."""
    links = {"PLLAVA_DECODER_SERVICE_HOST": "10.96.0.7", "PLLAVA_DECODER_SERVICE_PORT": "50052",
             "PLLAVA_DECODER_SERVICE_PORT_GRPC": "50052", "PLLAVA_DECODER_PORT": "tcp://10.96.0.7:50052",
             "PLLAVA_DECODER_PORT_50052_TCP": "tcp://10.96.0.7:50052", "PLLAVA_DECODER_PORT_50052_TCP_PROTO": "tcp",
             "PLLAVA_DECODER_PORT_50052_TCP_PORT": "50052", "PLLAVA_DECODER_PORT_50052_TCP_ADDR": "10.96.0.7"}
    s = load_settings(DecoderSettings, env_prefix=DECODER_ENV, environ={**links, "PLLAVA_DECODER_MODEL": "m"})
    assert s == DecoderSettings(model="m")
    s = load_settings(DecoderSettings, env_prefix=DECODER_ENV, environ={"PLLAVA_DECODER_MODEL": "m",
                                                                        "PLLAVA_DECODER_PORT": "50060"})
    assert s.port == 50060  # the setting itself still reads
    with pytest.raises(ValueError, match="unknown environment variable"):
        load_settings(DecoderSettings, env_prefix=DECODER_ENV, environ={"PLLAVA_DECODER_MODEL": "m",
                                                                        "PLLAVA_DECODER_PORTS": "1"})


def test_yaml_values_are_type_checked_and_converted(tmp_path):
    path = write(tmp_path, "count: 3\nratio: 2\nlimit: null\nshape: [7, 8, 9]\ntags: [p]\nverbose: true\n")
    assert load_settings(Demo, yaml_path=path) == Demo(count=3, ratio=2.0, shape=(7, 8, 9), tags=("p",),
                                                       verbose=True)
    assert load_settings(Demo, yaml_path=write(tmp_path, "")) == Demo()  # empty file: defaults


def test_unknown_yaml_keys_are_named_with_the_known_ones(tmp_path):
    path = write(tmp_path, "count: 2\ncuont: 3\nextra: 1\n")
    with pytest.raises(ValueError) as err:
        load_settings(Demo, yaml_path=path)
    message = str(err.value)
    assert "cuont, extra" in message and str(path) in message
    assert "known ones are name, count, ratio" in message


@pytest.mark.parametrize("text, where", [
    ("count: many\n", "key 'count'"),
    ("verbose: 1\n", "key 'verbose'"),
    ("shape: [1, 2]\n", "key 'shape'"),
    ("name: [1]\n", "key 'name'"),
])
def test_bad_yaml_values_name_the_file_and_key(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="must be") as err:
        load_settings(Demo, yaml_path=path)
    assert f"config file {path}, {where}" in str(err.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping"):
        load_settings(Demo, yaml_path=write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_settings(Demo, yaml_path=write(tmp_path, "a: [1\n"))
    with pytest.raises(ValueError, match="cannot be read"):
        load_settings(Demo, yaml_path=tmp_path / "missing.yaml")


@pytest.mark.parametrize("var, value", [("DEMO_COUNT", "4.5"), ("DEMO_VERBOSE", "maybe"),
                                        ("DEMO_SHAPE", "1,2"), ("DEMO_RATIO", "half")])
def test_bad_environment_values_name_the_variable(var, value):
    with pytest.raises(ValueError) as err:
        load_settings(Demo, env_prefix="DEMO_", environ={var: value})
    assert f"environment variable {var}" in str(err.value) and "must be" in str(err.value)


def test_unknown_environment_variables_with_the_prefix_are_errors():
    with pytest.raises(ValueError, match="DEMO_CONUT") as err:
        load_settings(Demo, env_prefix="DEMO_", environ={"DEMO_CONUT": "1", "OTHER": "x"})
    assert "DEMO_COUNT" in str(err.value)


def test_bad_flag_values_name_the_flag():
    with pytest.raises(ValueError, match="flag --count: must be an integer"):
        load_settings(Demo, overrides={"count": "x1"})
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        load_settings(Demo, overrides={"nope": 1})


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_floats_must_be_finite_in_every_layer(tmp_path, text):
    with pytest.raises(ValueError, match="environment variable DEMO_RATIO: must be a finite number"):
        load_settings(Demo, env_prefix="DEMO_", environ={"DEMO_RATIO": text})
    with pytest.raises(ValueError, match="key 'ratio': must be a finite number"):
        load_settings(Demo, yaml_path=write(tmp_path, f"ratio: {text}\n"))  # a YAML string, parsed like env
    with pytest.raises(ValueError, match="flag --ratio: must be a finite number"):
        load_settings(Demo, overrides={"ratio": float(text)})
    with pytest.raises(ValueError, match="key 'ratio': must be a finite number"):
        load_settings(Demo, yaml_path=write(tmp_path, "ratio: .nan\n"))  # YAML's own NaN float


def test_encoder_limits_from_flags_and_environment():
    args = build_parser().parse_args(["--max-frame-pixels", "2073600", "--decode-timeout-s", "7.5"])
    s = load_settings(EncoderSettings, env_prefix=ENV_PREFIX, environ={"PLLAVA_ENCODER_MODEL": "m"},
                      overrides=given_flags(args, EncoderSettings))
    assert (s.max_frame_pixels, s.decode_timeout_s) == (1920 * 1080, 7.5)
    defaults = EncoderSettings(model="m")
    assert (defaults.max_frame_pixels, defaults.decode_timeout_s, defaults.max_video_bytes) == (4096 * 4096, 60.0,
                                                                                                 64 << 20)
    with pytest.raises(ValueError, match="max_frame_pixels must be >= 1, got 0; decode_timeout_s must be > 0, got 0"):
        EncoderSettings(model="m", decode_timeout_s=0, max_frame_pixels=0)
    with pytest.raises(ValueError, match="decode_timeout_s must be > 0, got nan"):
        EncoderSettings(model="m", decode_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="batch_wait_ms must be >= 0, got nan"):
        EncoderSettings(model="m", batch_wait_ms=float("nan"))


def test_encoder_settings_are_validated():
    with pytest.raises(ValueError, match="port must be in 0..65535"):
        EncoderSettings(model="m", port=70000)
    with pytest.raises(ValueError, match="model is required"):
        EncoderSettings()
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_settings(EncoderSettings, env_prefix=ENV_PREFIX, environ={"PLLAVA_ENCODER_MODEL": "m",
                                                                       "PLLAVA_ENCODER_DTYPE": "fp8"})


def test_the_concurrent_rpc_limit_defaults_to_each_servers_own_room():
    assert concurrent_rpc_limit(EncoderSettings(model="m")) == 32 + SPARE_RPCS
    assert concurrent_rpc_limit(EncoderSettings(model="m", max_queue=4)) == 4 + SPARE_RPCS
    assert concurrent_rpc_limit(DecoderSettings(model="m")) == 8 + 32 + SPARE_RPCS
    assert concurrent_rpc_limit(DecoderSettings(model="m", max_batch=2, max_queue=3)) == 2 + 3 + SPARE_RPCS
    assert concurrent_rpc_limit(DecoderSettings(model="m", max_concurrent_rpcs=7)) == 7
    for settings in (EncoderSettings, DecoderSettings):
        with pytest.raises(ValueError, match="max_concurrent_rpcs must be >= 1, got 0"):
            settings(model="m", max_concurrent_rpcs=0)


def test_the_command_reports_bad_settings_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "model: m\nprot: 1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pllava-encoder: config file") and "unknown setting(s) prot" in err


def test_the_readme_lists_every_setting_of_both_servers():
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line.split("|")[1:4] for line in readme.splitlines() if re.match(r"\| `\w+`", line)]
    listed = {(name, server.strip()) for names, server, _ in rows for name in re.findall(r"`(\w+)`", names)}
    for cls, server in ((EncoderSettings, "encoder"), (DecoderSettings, "decoder")):
        missing = [f.name for f in dataclasses.fields(cls)
                   if (f.name, server) not in listed and (f.name, "both") not in listed]
        assert not missing, f"README's settings table lacks {server} settings {missing}"


@pytest.mark.parametrize("server", SERVERS)
def test_every_setting_has_its_flag(server):
    """The README promises a flag per setting: its name with dashes."""
    import dataclasses

    settings, _, parser = SERVERS[server]
    flags = {option for action in parser()._actions for option in action.option_strings}
    missing = [f.name for f in dataclasses.fields(settings) if "--" + f.name.replace("_", "-") not in flags]
    assert not missing, f"pllava-{server} has no flag for {missing}"


def test_prefix_reuse_is_turned_off_by_its_flag():
    def reuse(*flags):
        args = decoder_server.build_parser().parse_args(["--model", "m", *flags])
        return load_settings(DecoderSettings, env_prefix=DECODER_ENV, overrides=given_flags(args, DecoderSettings),
                             environ={}).reuse_prefixes

    assert reuse() is True and reuse("--no-reuse-prefixes") is False and reuse("--reuse-prefixes") is True


def test_deployment_files_name_only_known_setting_variables():
    """A server refuses an unknown variable with its prefix, so a misspelt (or compose-only)
    PLLAVA_DECODER_* name in a compose file or manifest stops it at start."""
    import dataclasses
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    known = {prefix + f.name.upper() for cls, prefix, _ in SERVERS.values() for f in dataclasses.fields(cls)}
    files = [*repo.glob("docker-compose*.yml"), *(p for p in (repo / "deploy").rglob("*") if p.is_file()),
             *(p for p in (repo / "docker").rglob("*") if p.is_file())]
    named = {(path.name, name) for path in files
             for name in re.findall(r"PLLAVA_(?:ENCODER|DECODER|OPENAI)_[A-Z0-9_]+", path.read_text(errors="ignore"))}
    assert len(named) >= 10  # (the TLS overlay alone names a dozen)
    unknown = sorted((file, name) for file, name in named if name not in known)
    assert not unknown, f"not a setting of its server: {unknown}"


@pytest.mark.parametrize("settings", [DecoderSettings, EncoderSettings])
def test_max_video_bytes_stays_within_a_grpc_message(settings):
    """gRPC's message limits are 32-bit: a larger limit is refused as a setting, not by an
    OverflowError when the server starts."""
    assert settings(model="m", max_video_bytes=(2 << 30) - (64 << 20)).max_video_bytes == 2080374784
    with pytest.raises(ValueError, match=r"max_video_bytes must be at most 2080374784 \(1984 MiB: a gRPC message is "
                                         r"at most 2 GiB\), got 3221225472"):
        settings(model="m", max_video_bytes=3 << 30)

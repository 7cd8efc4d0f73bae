"""The committed gRPC stubs are exactly what scripts/gen_protos.py produces."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"

sys.path.insert(0, str(ROOT / "scripts"))
import gen_protos
sys.path.remove(str(ROOT / "scripts"))


def test_pinned_grpcio_tools_version_installed():
    assert gen_protos.installed_tools_version() == gen_protos.GRPCIO_TOOLS_VERSION, (
        "the stubs are pinned to another grpcio-tools version: install "
        f"grpcio-tools=={gen_protos.GRPCIO_TOOLS_VERSION} or regenerate and update the pin")


def test_committed_stubs_equal_fresh_generation(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files = gen_protos.generated_files()
    assert files, "the generator lists no outputs"
    for rel in files:
        fresh = (out / rel).read_bytes()
        committed = CLIENT / rel
        assert committed.is_file(), f"{committed} is missing: run python scripts/gen_protos.py"
        assert committed.read_bytes() == fresh, (
            f"{committed} differs from the generator's output: run python scripts/gen_protos.py")
    # Nothing else is generated that is not committed.
    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert produced == sorted(files)


def test_stubs_import_and_describe_services():
    from pllava_proto.v1 import pllava_pb2, pllava_pb2_grpc

    pkg = pllava_pb2.DESCRIPTOR
    assert pkg.package == "pllava.v1"
    assert set(pkg.services_by_name) == {"Encoder", "Decoder"}
    enc = pkg.services_by_name["Encoder"].methods_by_name
    dec = pkg.services_by_name["Decoder"].methods_by_name
    assert enc["Encode"].server_streaming and not enc["Encode"].client_streaming
    assert dec["Caption"].server_streaming and not dec["Caption"].client_streaming
    assert enc["GetInfo"].output_type.name == dec["GetInfo"].output_type.name == "ModelInfo"
    for name in ("EncoderStub", "DecoderStub", "EncoderServicer", "DecoderServicer",
                 "add_EncoderServicer_to_server", "add_DecoderServicer_to_server"):
        assert hasattr(pllava_pb2_grpc, name)
    # Enums are type-prefixed with a zero UNSPECIFIED value.
    for enum in pkg.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(enum.name)).upper()
        prefix = {"D_TYPE": "DTYPE"}.get(prefix, prefix)
        assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED", enum.name
        assert all(v.name.startswith(prefix + "_") for v in enum.values), enum.name
    # Alternatives are oneofs; the seed has presence.
    assert [f.name for f in pllava_pb2.CaptionEvent.DESCRIPTOR.oneofs_by_name["event"].fields] == ["token", "final"]
    assert [f.name for f in pllava_pb2.EncodeResponse.DESCRIPTOR.oneofs_by_name["payload"].fields] == ["header", "chunk"]
    params = pllava_pb2.SamplingParams()
    assert not params.HasField("seed")
    params.seed = 0
    assert params.HasField("seed")


def test_every_message_field_and_enum_value_is_commented():
    """A comment directly above every message, enum, service, field, value and rpc."""
    import re

    lines = (ROOT / "protos" / "pllava_proto" / "v1" / "pllava.proto").read_text().splitlines()
    decl = re.compile(r"^\s*(message|enum|service|oneof|rpc)\s+\w+|^\s*(optional\s+|repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;|^\s*\w+\s*=\s*\d+;")
    missing = []
    for i, line in enumerate(lines):
        if decl.match(line) and not lines[i - 1].strip().startswith("//"):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert not missing, "uncommented declarations:\n" + "\n".join(missing)

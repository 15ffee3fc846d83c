"""deploy/logging: the Vector and Fluent Bit configs parse, pick exactly the standard output of the
sidecar container of deploy/kubernetes's pods (where stats.output_path "-" puts the records), and
the ClickHouse table has the records' columns."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from lmgate.report.query import RECORD_FIELDS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LOGGING = REPO / "deploy" / "logging"
KUBE = REPO / "deploy" / "kubernetes"


def deployment() -> dict:
    return yaml.safe_load((KUBE / "base" / "deployment.yaml").read_text())


def pod_labels() -> dict[str, str]:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def container_names() -> list[str]:
    return [c["name"] for c in deployment()["spec"]["template"]["spec"]["containers"]]


def namespace() -> str:
    return yaml.safe_load((KUBE / "overlays" / "example" / "kustomization.yaml").read_text())["namespace"]


def test_the_records_come_from_the_container_named_sidecar():
    assert container_names() == ["nginx", "sidecar"]
    config = (KUBE / "base" / "lmgate.yaml").read_text()
    assert yaml.safe_load(config)["stats"]["output_path"] == "-"


def test_vector_config_picks_the_sidecars_stdout_and_routes_it():
    config = tomllib.loads((LOGGING / "vector.toml").read_text())
    sources, transforms, sinks = config["sources"], config["transforms"], config["sinks"]
    (name, source), = sources.items()
    assert source["type"] == "kubernetes_logs"
    key, value = source["extra_label_selector"].split("=")
    assert pod_labels()[key] == value
    picked = transforms["lmgate_sidecar_stdout"]
    assert picked["type"] == "filter" and picked["inputs"] == [name]
    assert set(re.findall(r'\.kubernetes\.container_name == "([^"]+)"', picked["condition"])) == {"sidecar"}
    assert '.stream == "stdout"' in picked["condition"] and "||" not in picked["condition"]
    records = transforms["lmgate_records"]
    assert records["inputs"] == ["lmgate_sidecar_stdout"] and "parse_json!" in records["source"]
    assert {sink["type"] for sink in sinks.values()} == {"aws_s3", "clickhouse"}
    for sink in sinks.values():
        assert sink["inputs"] == ["lmgate_records"]
    s3 = sinks["lmgate_s3"]
    # What `lmgate report --stats` reads: newline-delimited JSON, .jsonl.gz files.
    assert (s3["encoding"]["codec"], s3["framing"]["method"]) == ("json", "newline_delimited")
    assert s3["compression"] == "gzip" and s3["filename_extension"] == "jsonl.gz"
    assert sinks["lmgate_clickhouse"]["table"] == "records"


def test_fluent_bit_config_picks_the_sidecars_stdout_and_routes_it():
    config = yaml.safe_load((LOGGING / "fluent-bit.yaml").read_text())
    pipeline = config["pipeline"]
    (tail,) = pipeline["inputs"]
    assert tail["name"] == "tail" and tail["multiline.parser"] == "cri"
    # The kubelet's names: /var/log/containers/<pod>_<namespace>_<container>-<container id>.log
    pod = f"{deployment()['metadata']['name']}-7d9f8b6c4-x2x9z"
    cid = "0123456789abcdef" * 4
    files = {name: f"/var/log/containers/{pod}_{namespace()}_{name}-{cid}.log" for name in container_names()}
    assert [name for name, path in files.items() if fnmatch.fnmatch(path, tail["path"])] == ["sidecar"]
    assert not fnmatch.fnmatch(f"/var/log/containers/other-5f6d7c8b9-abcde_{namespace()}_sidecar-{cid}.log",
                               tail["path"])
    grep, parser = pipeline["filters"]
    assert grep["name"] == "grep" and grep["regex"] == "stream ^stdout$"
    assert parser["name"] == "parser" and parser["key_name"] == "log" and parser["reserve_data"] is False
    assert {p["name"]: p["format"] for p in config["parsers"]}[parser["parser"]] == "json"
    outputs = {o["name"]: o for o in pipeline["outputs"]}
    assert set(outputs) == {"s3", "http"}
    for item in (grep, parser, *outputs.values()):
        assert item["match"] == tail["tag"]
    assert outputs["s3"]["s3_key_format"].endswith(".jsonl.gz") and outputs["s3"]["compression"] == "gzip"
    assert outputs["http"]["format"] == "json_lines" and "FORMAT%20JSONEachRow" in outputs["http"]["uri"]
    assert "INSERT%20INTO%20lmgate.records" in outputs["http"]["uri"]


def test_clickhouse_table_has_the_records_columns():
    sql = (LOGGING / "clickhouse.sql").read_text()
    body = sql[sql.index("lmgate.records\n(") + len("lmgate.records\n("):sql.index("\n)\nENGINE")]
    columns = [line.split()[0] for line in body.strip().splitlines()]
    assert columns == list(RECORD_FIELDS)

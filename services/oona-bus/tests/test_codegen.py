"""The committed generated code (and the catalog's JSON) matches its sources, and the contract has
no breaking change."""

from __future__ import annotations

import json
from importlib import resources

from google.protobuf import descriptor_pb2 as d
from google.protobuf import json_format, text_format
from oona import codegen
from oona.compat import breaking_changes
from oona.contracts import CATALOG_FILE, BlueprintCatalog


def test_regenerating_the_code_gives_no_diff():
    assert codegen.stale_files(codegen.generate()) == [], "run `python -m oona.codegen`"


def test_the_committed_catalog_json_is_what_codegen_writes_from_the_txtpb():
    assert codegen.CATALOG_JSON.read_bytes() == codegen.catalog_json(), (
        "run `python -m oona.codegen`")


def test_the_catalog_json_holds_the_txtpb_catalog_and_follows_its_edits():
    text = resources.files("oona").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    data = json.loads(codegen.catalog_json(text))
    assert "oona.codegen" in data.pop("_generated")
    assert json_format.ParseDict(data, BlueprintCatalog()) == text_format.Parse(
        text, BlueprintCatalog())
    edited = text.replace("hidden: 16", "hidden: 24")
    assert json.loads(codegen.catalog_json(edited))["blueprints"][0]["hidden"] == 24


def _current() -> d.FileDescriptorSet:
    return codegen.descriptor_set()


def _message(files: d.FileDescriptorSet, name: str) -> d.DescriptorProto:
    return next(m for f in files.file for m in f.message_type if m.name == name)


def test_current_contract_is_compatible_with_the_released_one():
    released = d.FileDescriptorSet.FromString(codegen.RELEASED_DESCRIPTORS.read_bytes())
    assert breaking_changes(released, _current()) == []


def test_removing_renumbering_or_retyping_a_field_is_breaking():
    old = _current()
    removed, renumbered, retyped, relabeled = (_current() for _ in range(4))
    del _message(removed, "LayerHealthReport").field[5]
    _message(renumbered, "CommandAck").field[2].number = 30
    _message(retyped, "FieldReport").field[0].type = d.FieldDescriptorProto.TYPE_BYTES
    _message(relabeled, "EpochEvent").field[0].label = d.FieldDescriptorProto.LABEL_REPEATED
    assert breaking_changes(old, removed) == [
        "kasmina.seeds.v1.LayerHealthReport.stage (= 6) removed without reserving its number"]
    assert breaking_changes(old, renumbered) == [
        "kasmina.seeds.v1.CommandAck.success (= 3) renumbered to 30"]
    assert breaking_changes(old, retyped) == [
        "kasmina.karn.v1.FieldReport.report_id (= 1) type changed"]
    assert breaking_changes(old, relabeled) == [
        "kasmina.jobs.v1.EpochEvent.job_id (= 1) cardinality changed"]


def test_removing_with_a_reservation_or_adding_is_compatible():
    old = _current()
    new = _current()
    report = _message(new, "LayerHealthReport")
    del report.field[5]
    report.reserved_range.add(start=6, end=7)
    unused = max(f.number for f in report.field) + 1
    report.field.add(name="new_metric", number=unused, type=d.FieldDescriptorProto.TYPE_FLOAT,
                     label=d.FieldDescriptorProto.LABEL_REPEATED)
    assert breaking_changes(old, new) == []


def test_removing_an_enum_value_a_message_or_an_rpc_is_breaking():
    old = _current()
    new = _current()
    stage_file = next(f for f in new.file if f.name == "kasmina/seeds/v1/stage.proto")
    del stage_file.enum_type[0].value[-1]
    karn = next(f for f in new.file if f.name == "kasmina/karn/v1/karn_service.proto")
    del karn.service[0].method[-1]
    events = next(f for f in new.file if f.name == "kasmina/jobs/v1/events.proto")
    del events.message_type[0]
    assert sorted(breaking_changes(old, new)) == [
        "kasmina.seeds.v1.SeedStage.SEED_STAGE_ROLLED_BACK (= 11) removed without reserving",
        "message kasmina.jobs.v1.EpochEvent removed",
        "rpc kasmina.karn.v1.Karn.Recommend removed",
    ]

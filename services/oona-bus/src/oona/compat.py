"""Breaking-change check of the wire contracts: the current descriptors against the released
snapshot (proto/released/descriptors.binpb). What breaks readers or writers of the old contract:
removing or renaming a file, message, enum, service or method; removing a field or enum value
without reserving its number; changing a field's number, type, cardinality or oneof; changing a
method's types or streaming. Adding is always fine.

    python -m oona.compat     # exit 1 and list the breaks, if any
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from google.protobuf import descriptor_pb2 as d

_Reserved = Iterable[d.DescriptorProto.ReservedRange] | Iterable[
    d.EnumDescriptorProto.EnumReservedRange]


def _messages(prefix: str, messages: Iterable[d.DescriptorProto]
              ) -> Iterator[tuple[str, d.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(name, message.nested_type)


def _enums(prefix: str, file_or_message: d.FileDescriptorProto | d.DescriptorProto
           ) -> Iterator[tuple[str, d.EnumDescriptorProto]]:
    for enum in file_or_message.enum_type:
        yield f"{prefix}.{enum.name}", enum
    nested = (file_or_message.message_type if isinstance(file_or_message, d.FileDescriptorProto)
              else file_or_message.nested_type)
    for message in nested:
        yield from _enums(f"{prefix}.{message.name}", message)


def _is_reserved(number: int, ranges: _Reserved, end_inclusive: bool) -> bool:
    # Message reserved ranges are [start, end); enum reserved ranges are [start, end].
    return any(r.start <= number < r.end + (1 if end_inclusive else 0) for r in ranges)


def _oneof_name(message: d.DescriptorProto, field: d.FieldDescriptorProto) -> str | None:
    if not field.HasField("oneof_index") or field.proto3_optional:
        return None
    return str(message.oneof_decl[field.oneof_index].name)


def _compare_message(name: str, old: d.DescriptorProto, new: d.DescriptorProto) -> list[str]:
    breaks = []
    new_fields = {f.number: f for f in new.field}
    new_numbers = {f.name: f.number for f in new.field}
    for field in old.field:
        where = f"{name}.{field.name} (= {field.number})"
        current = new_fields.get(field.number)
        if current is None:
            if field.name in new_numbers:
                breaks.append(f"{where} renumbered to {new_numbers[field.name]}")
            elif not _is_reserved(field.number, new.reserved_range, end_inclusive=False):
                breaks.append(f"{where} removed without reserving its number")
            continue
        if current.name != field.name:
            breaks.append(f"{where} renamed to {current.name}")
        if (current.type, current.type_name) != (field.type, field.type_name):
            breaks.append(f"{where} type changed")
        if current.label != field.label:
            breaks.append(f"{where} cardinality changed")
        if _oneof_name(new, current) != _oneof_name(old, field):
            breaks.append(f"{where} moved into or out of a oneof")
        if current.proto3_optional != field.proto3_optional:
            breaks.append(f"{where} presence (optional) changed")
    return breaks


def _compare_enum(name: str, old: d.EnumDescriptorProto, new: d.EnumDescriptorProto) -> list[str]:
    breaks = []
    new_values = {v.number: v.name for v in new.value}
    for value in old.value:
        if value.number not in new_values:
            if not _is_reserved(value.number, new.reserved_range, end_inclusive=True):
                breaks.append(f"{name}.{value.name} (= {value.number}) removed without reserving")
        elif new_values[value.number] != value.name:
            breaks.append(f"{name}.{value.name} (= {value.number}) renamed to "
                          f"{new_values[value.number]}")
    return breaks


def _compare_services(old: d.FileDescriptorProto, new: d.FileDescriptorProto) -> list[str]:
    breaks = []
    new_services = {s.name: s for s in new.service}
    for service in old.service:
        name = f"{old.package}.{service.name}"
        if service.name not in new_services:
            breaks.append(f"service {name} removed")
            continue
        methods = {m.name: m for m in new_services[service.name].method}
        for method in service.method:
            current = methods.get(method.name)
            if current is None:
                breaks.append(f"rpc {name}.{method.name} removed")
            elif ((current.input_type, current.output_type, current.client_streaming,
                   current.server_streaming) != (method.input_type, method.output_type,
                                                 method.client_streaming,
                                                 method.server_streaming)):
                breaks.append(f"rpc {name}.{method.name} signature changed")
    return breaks


def breaking_changes(old: d.FileDescriptorSet, new: d.FileDescriptorSet) -> list[str]:
    """Every way `new` breaks compatibility with `old`; empty when it is compatible."""
    breaks = []
    new_files = {f.name: f for f in new.file}
    for old_file in old.file:
        new_file = new_files.get(old_file.name)
        if new_file is None:
            breaks.append(f"file {old_file.name} removed")
            continue
        if new_file.package != old_file.package:
            breaks.append(f"file {old_file.name} changed package")
            continue
        prefix = old_file.package
        new_messages = dict(_messages(prefix, new_file.message_type))
        for name, message in _messages(prefix, old_file.message_type):
            if name not in new_messages:
                breaks.append(f"message {name} removed")
            else:
                breaks += _compare_message(name, message, new_messages[name])
        new_enums = dict(_enums(prefix, new_file))
        for name, enum in _enums(prefix, old_file):
            if name not in new_enums:
                breaks.append(f"enum {name} removed")
            else:
                breaks += _compare_enum(name, enum, new_enums[name])
        breaks += _compare_services(old_file, new_file)
    return breaks


def main() -> int:
    from oona.codegen import RELEASED_DESCRIPTORS, descriptor_set

    released = d.FileDescriptorSet.FromString(RELEASED_DESCRIPTORS.read_bytes())
    breaks = breaking_changes(released, descriptor_set())
    for line in breaks:
        print(f"breaking: {line}", file=sys.stderr)
    return 1 if breaks else 0


if __name__ == "__main__":
    raise SystemExit(main())

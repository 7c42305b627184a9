"""Documents and metadata between protos and the dataclasses the services use."""

from collections.abc import Mapping

from twostage.corpus import Document, MetadataValue
from twostage.v1 import common_pb2

_INTEGRAL = 2**53  # doubles hold every integer up to here exactly


def metadata_value_to_proto(value: MetadataValue) -> common_pb2.MetadataValue:
    if isinstance(value, bool):
        return common_pb2.MetadataValue(bool_value=value)
    if isinstance(value, int | float):
        return common_pb2.MetadataValue(number_value=float(value))
    if isinstance(value, list):
        return common_pb2.MetadataValue(string_list=common_pb2.StringList(values=value))
    return common_pb2.MetadataValue(string_value=str(value))


def metadata_value_from_proto(value: common_pb2.MetadataValue) -> MetadataValue:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < _INTEGRAL else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "string_list":
        return list(value.string_list.values)
    return value.string_value  # an unset value reads as ""


def metadata_to_proto(metadata: Mapping[str, MetadataValue]) -> dict[str, common_pb2.MetadataValue]:
    return {key: metadata_value_to_proto(value) for key, value in metadata.items()}


def metadata_from_proto(metadata: Mapping[str, common_pb2.MetadataValue]) -> dict[str, MetadataValue]:
    return {key: metadata_value_from_proto(value) for key, value in metadata.items()}


def document_to_proto(doc: Document) -> common_pb2.Document:
    return common_pb2.Document(id=doc.id, title=doc.title, text=doc.text, metadata=metadata_to_proto(doc.metadata))


def document_from_proto(doc: common_pb2.Document) -> Document:
    return Document(doc.id, doc.title, doc.text, metadata_from_proto(doc.metadata))

"""Documents, metadata and write versions between protos and the dataclasses the services use."""

from collections.abc import Mapping

import numpy as np

from twostage.batching import Cost
from twostage.corpus import Document, MetadataValue
from twostage.errors import InvalidArgument
from twostage.filters import BOUNDS, Filter, FilterClause, NumberRange, check_filter
from twostage.recall_mode import RecallMode
from twostage.scoring import Calibration, Fusion, HybridFusion
from twostage.v1 import common_pb2, gateway_pb2, recall_pb2
from twostage.versions import Version

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


def filter_from_proto(proto: common_pb2.Filter) -> Filter | None:
    """A request's filter, checked (INVALID_ARGUMENT names the clause); None when it has no clauses."""
    clauses = []
    for clause in proto.clauses:
        test = clause.WhichOneof("test")
        if test == "equals":
            clauses.append(FilterClause(clause.key, equals=metadata_value_from_proto(clause.equals)))
        elif test == "any_of":
            clauses.append(FilterClause(clause.key, any_of=tuple(
                metadata_value_from_proto(v) for v in clause.any_of.values)))
        elif test == "range":
            r = clause.range
            clauses.append(FilterClause(clause.key, range=NumberRange(
                **{name: getattr(r, name) for name in BOUNDS if r.HasField(name)})))
        else:
            clauses.append(FilterClause(clause.key))  # no test: check_filter says so
    return check_filter(clauses)


def filter_to_proto(filter_: Filter | None) -> common_pb2.Filter:
    if filter_ is None:
        return common_pb2.Filter()
    clauses = []
    for c in filter_.clauses:
        if c.range is not None:
            clauses.append(common_pb2.FilterClause(key=c.key, range=common_pb2.NumberRange(**c.range.given())))
        elif c.any_of is not None:
            clauses.append(common_pb2.FilterClause(key=c.key, any_of=common_pb2.ValueList(
                values=[metadata_value_to_proto(v) for v in c.any_of])))
        else:
            clauses.append(common_pb2.FilterClause(key=c.key, equals=metadata_value_to_proto(c.equals)))
    return common_pb2.Filter(clauses=clauses)


RECALL_MODES = {RecallMode.DENSE: common_pb2.RECALL_MODE_DENSE, RecallMode.LEXICAL: common_pb2.RECALL_MODE_LEXICAL,
                RecallMode.HYBRID: common_pb2.RECALL_MODE_HYBRID}


def recall_mode_from_proto(mode: int) -> RecallMode | None:
    """None when unspecified (the server's default applies); INVALID_ARGUMENT for a value this build does not know."""
    for name, value in RECALL_MODES.items():
        if value == mode:
            return name
    if mode != common_pb2.RECALL_MODE_UNSPECIFIED:
        raise InvalidArgument(f"recall_mode: unknown value {mode}")
    return None


def recall_mode_to_proto(mode: RecallMode | None) -> int:
    return RECALL_MODES[mode] if mode else common_pb2.RECALL_MODE_UNSPECIFIED


HYBRID_FUSIONS = {HybridFusion.ZSCORE: recall_pb2.HYBRID_FUSION_ZSCORE,
                  HybridFusion.RRF: recall_pb2.HYBRID_FUSION_RRF}


def hybrid_fusion_from_proto(fusion: int) -> HybridFusion | None:
    """None when unspecified (a recall server that does not say)."""
    return next((name for name, value in HYBRID_FUSIONS.items() if value == fusion), None)


def hybrid_fusion_to_proto(fusion: HybridFusion) -> int:
    return HYBRID_FUSIONS[HybridFusion(fusion)]


FUSIONS = {Fusion.NONE: gateway_pb2.FUSION_NONE, Fusion.LINEAR: gateway_pb2.FUSION_LINEAR,
           Fusion.RRF: gateway_pb2.FUSION_RRF, Fusion.CALIBRATED: gateway_pb2.FUSION_CALIBRATED}


def fusion_from_proto(fusion: int) -> Fusion | None:
    """None when unspecified or unknown to this version (the gateway's default applies)."""
    return next((name for name, value in FUSIONS.items() if value == fusion), None)


def fusion_to_proto(fusion: Fusion | None) -> int:
    return FUSIONS[Fusion(fusion)] if fusion else gateway_pb2.FUSION_METHOD_UNSPECIFIED


def calibration_from_proto(proto: recall_pb2.ScoreCalibration | gateway_pb2.FusionCalibration) -> Calibration:
    """The constants of a recall server's fit or of the gateway's calibration in use."""
    return Calibration(proto.scale, proto.center, proto.lexical_scale, proto.lexical_center)


def _constants(calibration: Calibration) -> dict[str, float]:
    return {"scale": calibration.scale, "center": calibration.center, "lexical_scale": calibration.lexical_scale,
            "lexical_center": calibration.lexical_center}


def fitted_calibration_to_proto(fitted) -> recall_pb2.ScoreCalibration | None:
    """A recall server's fit (``recall_server.calibration.FittedCalibration``: the constants and what they were
    fitted on); None when it has not fitted."""
    if fitted is None:
        return None
    return recall_pb2.ScoreCalibration(**_constants(fitted), pseudo_queries=fitted.pseudo_queries,
                                       doc_count=fitted.doc_count)


def fusion_calibration_to_proto(calibration: Calibration) -> gateway_pb2.FusionCalibration:
    """The constants the gateway's calibrated fusion uses."""
    return gateway_pb2.FusionCalibration(**_constants(calibration))


def vector_to_bytes(vector) -> bytes:
    """A vector on the wire: float32 little-endian, as stored."""
    return np.asarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes, field: str = "vector") -> np.ndarray | None:
    """None when empty; INVALID_ARGUMENT naming the field when it is no whole number of float32 values."""
    if not data:
        return None
    if len(data) % 4:
        raise InvalidArgument(f"{field} has {len(data)} bytes, not a whole number of float32 values")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def version_from_proto(proto: common_pb2.WriteVersion) -> Version:
    return Version(proto.clock, proto.writer)


def version_to_proto(version: Version) -> common_pb2.WriteVersion:
    return common_pb2.WriteVersion(clock=version.clock, writer=version.writer)


def cost_to_proto(cost: Cost) -> common_pb2.Cost:
    return common_pb2.Cost(queue_ms=cost.queue_ms, service_ms=cost.service_ms, ms_per_item=cost.ms_per_item)


def cost_from_proto(proto: common_pb2.Cost) -> Cost:
    return Cost(proto.queue_ms, proto.service_ms, proto.ms_per_item)

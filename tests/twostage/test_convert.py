import pytest

from recall_server.calibration import FittedCalibration
from twostage.convert import (
    calibration_from_proto,
    fitted_calibration_to_proto,
    fusion_calibration_to_proto,
    recall_mode_from_proto,
    recall_mode_to_proto,
)
from twostage.errors import InvalidArgument
from twostage.recall_mode import RecallMode
from twostage.scoring import DEFAULT_CALIBRATION, Calibration
from twostage.v1 import common_pb2, gateway_pb2, recall_pb2


def test_every_recall_mode_round_trips_through_the_proto_enum():
    named = {value for value in common_pb2.RecallMode.values() if value != common_pb2.RECALL_MODE_UNSPECIFIED}
    assert {recall_mode_to_proto(mode) for mode in RecallMode} == named  # one proto value each, none left over
    for value in named:
        mode = recall_mode_from_proto(value)
        assert isinstance(mode, RecallMode) and recall_mode_to_proto(mode) == value
        assert common_pb2.RecallMode.Name(value) == f"RECALL_MODE_{mode.name}"


def test_a_mode_named_as_settings_and_flags_name_it_converts_like_the_enum():
    for mode in RecallMode:
        assert recall_mode_to_proto(mode.value) == recall_mode_to_proto(mode)


def test_unspecified_means_the_servers_default_and_an_unknown_value_is_refused():
    assert recall_mode_from_proto(common_pb2.RECALL_MODE_UNSPECIFIED) is None
    assert recall_mode_to_proto(None) == common_pb2.RECALL_MODE_UNSPECIFIED
    unknown = max(common_pb2.RecallMode.values()) + 1
    with pytest.raises(InvalidArgument, match=f"recall_mode: unknown value {unknown}"):
        recall_mode_from_proto(unknown)


# Constants a float32 holds exactly, so the round trip can be compared with ==.
CONSTANTS = Calibration(scale=96.5, center=0.75, lexical_scale=0.375, lexical_center=12.25)


def test_a_recall_servers_fit_round_trips_through_score_calibration_with_what_it_was_fitted_on():
    fitted = FittedCalibration(scale=96.5, center=0.75, lexical_scale=0.375, lexical_center=12.25,
                               pseudo_queries=64, doc_count=5183)
    proto = fitted_calibration_to_proto(fitted)
    assert isinstance(proto, recall_pb2.ScoreCalibration)
    assert (proto.pseudo_queries, proto.doc_count) == (64, 5183)
    assert calibration_from_proto(proto) == CONSTANTS
    assert calibration_from_proto(recall_pb2.ScoreCalibration.FromString(proto.SerializeToString())) == CONSTANTS
    assert fitted_calibration_to_proto(None) is None  # not fitted yet: the field stays unset


def test_the_gateways_calibration_round_trips_through_fusion_calibration():
    proto = fusion_calibration_to_proto(CONSTANTS)
    assert isinstance(proto, gateway_pb2.FusionCalibration)
    assert calibration_from_proto(gateway_pb2.FusionCalibration.FromString(proto.SerializeToString())) == CONSTANTS
    # The wire carries float32: the built-in constants come back within its precision.
    back = calibration_from_proto(fusion_calibration_to_proto(DEFAULT_CALIBRATION))
    assert back == Calibration(*(pytest.approx(v, rel=1e-7) for v in (
        DEFAULT_CALIBRATION.scale, DEFAULT_CALIBRATION.center, DEFAULT_CALIBRATION.lexical_scale,
        DEFAULT_CALIBRATION.lexical_center)))

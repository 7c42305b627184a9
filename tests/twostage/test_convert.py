import pytest

from twostage.convert import recall_mode_from_proto, recall_mode_to_proto
from twostage.errors import InvalidArgument
from twostage.recall_mode import RecallMode
from twostage.v1 import common_pb2


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

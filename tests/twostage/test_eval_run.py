"""What ``twostage eval`` and ``tune`` learn from a gateway before they recompute its final order."""

import grpc
import pytest

from twostage.convert import fusion_calibration_to_proto
from twostage.evaluation.eval_run import gateway_fusion
from twostage.scoring import Calibration, Fusion
from twostage.v1 import gateway_pb2, gateway_pb2_grpc


class AnsweringInfo(gateway_pb2_grpc.GatewayServicer):
    """A gateway whose Info says what the test chooses (the fault injected: a method this client cannot use)."""

    def __init__(self, info: gateway_pb2.GatewayInfo):
        self.info = info

    async def Info(self, request, context):
        return self.info


async def fusion_reported_by(info: gateway_pb2.GatewayInfo):
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(AnsweringInfo(info), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await gateway_fusion(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def test_the_gateways_method_alpha_and_calibration_come_back_typed():
    calibration = Calibration(96.5, 0.75, 0.375, 12.25)
    reported = await fusion_reported_by(gateway_pb2.GatewayInfo(
        default_fusion=gateway_pb2.FUSION_CALIBRATED, default_fusion_alpha=0.5,
        calibration=fusion_calibration_to_proto(calibration)))
    assert reported == (Fusion.CALIBRATED, 0.5, calibration)


@pytest.mark.parametrize(("code", "named"), [(gateway_pb2.FUSION_METHOD_UNSPECIFIED, "FUSION_METHOD_UNSPECIFIED"),
                                             (99, "unknown value 99")])
async def test_a_method_this_client_cannot_recompute_is_an_error_not_a_flat_sweep(code, named):
    with pytest.raises(ValueError, match=f"reports default_fusion {named}; the final order can only be recomputed "
                                         "for one of none, linear, rrf, calibrated"):
        await fusion_reported_by(gateway_pb2.GatewayInfo(default_fusion=code, default_fusion_alpha=0.7))

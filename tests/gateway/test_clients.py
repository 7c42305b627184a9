"""The stage clients' call metadata: made once while it stays the same, never stale after a change."""

from gateway.clients import RerankClient


async def test_call_metadata_follows_every_change_of_token():
    client = RerankClient("127.0.0.1:9", "rerank 0")
    try:
        first = (("authorization", "Bearer first"),)
        second = (("authorization", "Bearer second"),)
        made = client._aio_metadata(first)
        assert list(made) == list(first)
        assert client._aio_metadata(first) is made  # unchanged: the same object, not a copy per call
        assert list(client._aio_metadata(second)) == list(second)  # a rotated token at the next call
        assert client._aio_metadata(()) is None  # no token any more: nothing sent
        assert list(client._aio_metadata(first)) == list(first)  # back to the first: not the second's
        traced = (*first, ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
        assert list(client._aio_metadata(traced)) == list(traced)
    finally:
        await client.close()

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from ledger import codec


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"\x00\xffbytes",
        "unicode ✓ \u0000",
        {"nested": [1, 2.5, None, True, {"deep": [b"x", uuid.UUID(int=7)]}]},
        2**63 - 1,
        -(2**63),
    ],
)
def test_values_round_trip_exactly(value):
    assert codec.loads(codec.dumps(value)) == value


def test_datetimes_come_back_in_utc():
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 5, 1, 12, 0, tzinfo=plus_two)
    back = codec.loads(codec.dumps(local))
    assert back == local
    assert back.tzinfo == timezone.utc


def test_naive_datetime_is_refused_with_a_clear_error():
    with pytest.raises(codec.CodecError, match="naive datetime"):
        codec.dumps({"at": datetime(2026, 1, 1)})


def test_unencodable_value_names_its_type():
    with pytest.raises(codec.CodecError, match="cannot encode object"):
        codec.dumps({"x": object()})


def test_corrupt_bytes_raise_codec_error():
    with pytest.raises(codec.CodecError, match="corrupt msgpack payload"):
        codec.loads(b"\xc1\xc1\xc1")

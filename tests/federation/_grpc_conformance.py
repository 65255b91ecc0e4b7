"""Wire-conformance client built on grpcio alone (run as a separate process: grpcio must
never load next to pyarrow's Flight). Speaks the Flight protobufs by hand and prints JSON."""

from __future__ import annotations

import json
import sys

import grpc

SERVICE = "/arrow.flight.protocol.FlightService/"


def varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    for _ in range(10):
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise ValueError("varint too long")


def decode(buf: bytes) -> dict[int, list]:
    """A minimal protobuf decoder: field number -> values (bytes for length-delimited)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 2:
            n, i = varint(buf, i)
            v, i = buf[i : i + n], i + n
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        out.setdefault(field, []).append(v)
    return out


def enc_bytes(field: int, data: bytes) -> bytes:
    n, out = len(data), bytearray([(field << 3) | 2])
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + data


def main(target: str) -> None:
    ident = lambda b: b  # noqa: E731
    ch = grpc.insecure_channel(target)
    call = lambda name: ch.unary_stream(SERVICE + name, request_serializer=ident, response_deserializer=ident)  # noqa: E731
    res: dict = {}
    res["actions"] = [decode(m)[1][0].decode() for m in call("ListActions")(b"", timeout=10)]
    health = list(call("DoAction")(enc_bytes(1, b"health"), timeout=10))
    res["health"] = json.loads(decode(health[0])[1][0])
    # Criteria.expression (field 1) names the card formats this reader reads (docs/format.md, 11)
    criteria = enc_bytes(1, json.dumps({"formats": [1, 2]}).encode())
    infos = [decode(m) for m in call("ListFlights")(criteria, timeout=10)]
    res["listed"] = []
    for info in infos:
        header = json.loads(info[7][0])
        endpoint = decode(info[3][0])
        ticket = decode(endpoint[1][0])[1][0]
        locations = [decode(loc)[1][0].decode() for loc in endpoint.get(2, [])]
        body = 0
        messages = 0
        for m in call("DoGet")(enc_bytes(1, ticket), timeout=30):
            d = decode(m)
            messages += 1
            body += sum(len(x) for x in d.get(1000, []))
        res["listed"].append(
            {
                "name": header["name"],
                "digest": header["digest"],
                "ticket": ticket.decode(),
                "rows": info[4][0],
                "bytes": info[5][0],
                "locations": locations,
                "body_bytes": body,
                "messages": messages,
            }
        )
    try:
        list(call("ListFlights")(b"", timeout=10, metadata=(("loraflight-protocol", "2.0"),)))
        res["major2"] = "accepted"
    except grpc.RpcError as e:
        res["major2"] = e.details()
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])

"""A KServe gRPC v2 client call with KServe's own client (``kserve.InferenceGRPCClient``): run by
the KServe SDK's Python (graviton_serve.deploy_checks.kserve_python), not this project's.

    python tests/kserve_grpc_call.py HOST:PORT MODEL REQUEST_ID TEXT [TEXT ...]

Each TEXT is one BYTES input (``in0``, ``in1``, ...). Prints the reply as JSON: id, model and each
output's name, datatype, shape and data (bytes decoded as UTF-8); a gRPC error prints its code and
details and exits 1."""

import asyncio
import json
import sys

import grpc
import numpy
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def call(url: str, model: str, request_id: str, texts: list[str]) -> dict:
    client = InferenceGRPCClient(url=url, timeout=120)
    inputs = []
    for index, text in enumerate(texts):
        item = InferInput(name=f"in{index}", shape=[1], datatype="BYTES")
        item.set_data_from_numpy(numpy.array([text.encode()], dtype=object))
        inputs.append(item)
    try:
        reply = await client.infer(InferRequest(model_name=model, infer_inputs=inputs, request_id=request_id))
    finally:
        await client.close()
    return {"id": reply.id, "model_name": reply.model_name,
            "outputs": [{"name": output.name, "datatype": output.datatype, "shape": list(output.shape),
                         "data": [item.decode() if isinstance(item, bytes) else item for item in output.data]}
                        for output in reply.outputs]}


def main() -> int:
    url, model, request_id, *texts = sys.argv[1:]
    try:
        print(json.dumps(asyncio.run(call(url, model, request_id, texts))))
    except grpc.RpcError as error:
        print(json.dumps({"code": error.code().name, "details": error.details()}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The path budget's sample classification: each py-spy stack goes to the first stage matching one
of its frames, innermost first; raw (collapsed) lines are summed per stage."""

from loadtest.bench_path_budget import parse_raw, stage_of

UVICORN = "run (uvicorn/server.py:65);handle (h11/_connection.py:500)"


def test_the_innermost_matching_frame_decides():
    assert stage_of(UVICORN + ";dumps (json/__init__.py:231)") == "JSON"  # JSON called by the HTTP server
    assert stage_of(UVICORN) == "HTTP server (uvicorn, h11, httptools)"
    assert stage_of("run (threading.py:1)" + ";predict (models/onnx_backend.py:200);run "
                    "(onnxruntime/capi/onnxruntime_inference_collection.py:266)") == "model (ONNX Runtime / torch)"
    torch_stack = "predict (models/torch_backend.py:60);forward (transformers/models/bert/modeling_bert.py:900)"
    assert stage_of(torch_stack + ";forward (torch/nn/modules/linear.py:125)") == "model (ONNX Runtime / torch)"
    assert stage_of("run (threading.py:1);_loop (serve/server/batching.py:90)") == "our serving code"
    assert stage_of("main (somewhere.py:1)") == "other"


def test_raw_lines_are_summed_per_stage():
    text = "\n".join([UVICORN + " 7", UVICORN + ";dumps (json/__init__.py:231) 3", "main (x.py:1) 2", "garbage"])
    assert parse_raw(text) == {"HTTP server (uvicorn, h11, httptools)": 7, "JSON": 3, "other": 2}

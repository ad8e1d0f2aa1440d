"""The path budget's classification: each py-spy stack goes to the first stage matching one of its
frames, innermost first; GIL samples (``--threads`` raw lines) are summed per stage, the model's
executor threads counted apart; replica threads are grouped by their Python names."""

from loadtest.bench_path_budget import gil_samples, stage_of, thread_group

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


def test_gil_samples_are_summed_per_stage_and_the_model_threads_apart():
    text = "\n".join([
        "thread (11): AsyncIO Thread: default;" + UVICORN + " 7",
        "thread (11): AsyncIO Thread: default;" + UVICORN + ";dumps (json/__init__.py:231) 3",
        "thread (12): minilm-onnx_0;run (threading.py:1);predict (models/onnx_backend.py:200) 4",
        "thread (13): minilm-torch_0;main (x.py:1) 2",  # another variant's thread of the same model
        "main (x.py:1) 1",  # a line without a thread frame
        "garbage",
    ])
    stages, model = gil_samples(text, "minilm")
    assert stages == {"HTTP server (uvicorn, h11, httptools)": 7, "JSON": 3, "model (ONNX Runtime / torch)": 4,
                      "other": 3}
    assert model == 6


def test_threads_are_grouped_by_name():
    assert thread_group("AsyncIO Thread: default", "minilm") == "event loop"
    assert thread_group("minilm-onnx-int8_0", "minilm") == "model executor thread"
    assert thread_group("storyteller-torch_0", "minilm") == "other Python threads"
    assert thread_group("MainThread", "minilm") == "Ray's main thread"
    assert thread_group(None, "minilm") == "Ray's C++ threads (gRPC, I/O, metrics)"


def test_gil_shares_split_the_python_cpu_and_the_rest_of_the_model_thread_is_compute():
    from loadtest.bench_path_budget import cpu_split

    # 1,000 us of GIL time (wall: preempted holders inflate it), 200 of it the model thread's;
    # the Python threads used 600 us of CPU, so Python work is 600 / (1 - 0.2) = 750 us in all
    run = {"gil_us": {"HTTP server (uvicorn, h11, httptools)": 500.0, "tokenization": 300.0,
                      "model (ONNX Runtime / torch)": 200.0},
           "thread_us": {"event loop": 550.0, "Ray's main thread": 50.0, "model executor thread": 3000.0},
           "model_compute_us": 2800.0}
    stages, compute = cpu_split(run)
    assert stages == {"HTTP server (uvicorn, h11, httptools)": 375.0, "tokenization": 225.0,
                      "model (ONNX Runtime / torch)": 150.0}
    assert compute == 3000.0 - 150.0

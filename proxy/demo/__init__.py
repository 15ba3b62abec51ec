"""The demo's real models, data and traffic (see docs/demo.md).

- :mod:`proxy.demo.capture`: the platform slices (how each platform captures a digit);
- :mod:`proxy.demo.assets`: shipped ONNX models, the held-out pool, the manifest;
- :mod:`proxy.demo.traffic`: seeded traffic scenarios (requests, delayed labels);
- :mod:`proxy.demo.recorded`: the same traffic as a paired-record JSONL file;
- :mod:`proxy.demo.sizing`: how many labelled pairs the gates need to decide.
"""

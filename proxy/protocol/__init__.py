"""The Open Inference Protocol (KServe V2) wire format, and the model interface it carries."""

"""graviton-serve's operator tooling: set-up, the demo model store, TorchServe control, gRPC client.

The code that runs inside TorchServe's workers lives in the top-level ``handlers`` package and is
copied into every .mar; nothing here is needed at serving time.
"""

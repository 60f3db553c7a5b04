"""Inference: the decode step and its drivers (one request at a time, or the serving engine), the
OpenAI-compatible server and the command lines.

    from longspec_jax.infer import Decoder, Engine
"""

from longspec_jax.infer.decoder import Decoder, generate_ar, generate_tree
from longspec_jax.infer.engine import Engine, Event, Request

__all__ = ["Decoder", "Engine", "Event", "Request", "generate_ar", "generate_tree"]

"""smile-stream: stream a base LLM plus LoRA adapters and fine-tunes into a SMILE mixture of low-rank experts.

Pipeline, one module per stage: sources -> plan -> factorize -> write -> load.
"""

from .convert import Result, convert
from .errors import SmileError
from .load import inspect_output, load_model, model_class
from .modeling_smile import SmileLinear, smile_model_class
from .options import Options
from .plan import make_plan
from .verify import verify

__all__ = [
    "Options",
    "Result",
    "SmileError",
    "SmileLinear",
    "convert",
    "inspect_output",
    "load_model",
    "make_plan",
    "model_class",
    "verify",
    "smile_model_class",
]
__version__ = "0.1.0"
